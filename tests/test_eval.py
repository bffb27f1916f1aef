"""`slimllm.evaluation.evaluate`, the local lm-eval task configs and `python -m slimllm eval`.

Fast: tiny random models (conftest.make_tiny_model) and the shared data folder. Perplexity and
zero-shot accuracy are checked against independent computations written here with plain torch.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from slimllm.evaluation import evaluate
from slimllm.errors import ConfigError, SlimLLMError
from slimllm.evaluation.tasks import LOCAL_TASKS, TASKS_DIR

TEXT = (
    "Pruning removes attention heads and intermediate channels of a language model. "
    "The quick brown fox jumps over the lazy dog. Perplexity measures how well a model "
    "predicts text, one token after another, window after window. "
) * 12


@pytest.fixture(scope="module")
def tiny(make_tiny_model, tiny_tokenizer):
    return make_tiny_model("llama", seed=1), tiny_tokenizer


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- perplexity


def reference_ppl(model, tokenizer, text: str, seq_len: int, max_windows: int | None) -> tuple[float, int]:
    """Independent: token ids, manual window slicing, one forward and one mean cross-entropy
    per window; equal-length windows, so the mean of window means is the token mean."""
    ids = tokenizer(text).input_ids
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = torch.tensor(ids[i * seq_len : (i + 1) * seq_len])
            logits = model(window[None]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits[:-1].double(), window[1:]).item())
    return math.exp(sum(losses) / n), n


@pytest.mark.parametrize("seq_len,max_windows,batch_size", [(32, None, 1), (32, 5, 3), (64, 2, 2)])
def test_perplexity_matches_independent_torch(tiny, text_file, seq_len, max_windows, batch_size):
    model, tok = tiny
    r = evaluate.evaluate_perplexity(
        model, tok, text_file, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size
    )
    ref, n = reference_ppl(model, tok, TEXT, seq_len, max_windows)
    assert r.windows == n
    assert r.tokens == n * (seq_len - 1)
    assert r.seq_len == seq_len
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert r.nll == pytest.approx(math.log(ref), rel=1e-5)
    assert r.source == str(text_file)


def test_windows_are_non_overlapping_prefix(tiny):
    _, tok = tiny
    ids = tok(TEXT).input_ids
    w = evaluate.tokenize_windows(tok, TEXT, seq_len=16, max_windows=3)
    assert w.shape == (3, 16) and w.dtype == torch.long
    assert w.flatten().tolist() == ids[:48]


def test_named_texts_are_joined_like_hf_loaders(data_dir):
    wiki, src = evaluate.load_ppl_text("wikitext2", data_dir)
    assert src == str(data_dir / "wikitext2" / "wiki.test.raw")
    lines = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    assert wiki == "\n\n".join(lines)  # HF wikitext rows keep their "\n"
    assert wiki.startswith(" = Robert Boulter = \n\n\n Robert Boulter is an English film")
    ptb, _ = evaluate.load_ppl_text("ptb", data_dir)
    sentences = (data_dir / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines()
    assert len(sentences) == 3761
    assert ptb == "\n\n".join(s.strip() for s in sentences)  # HF ptb_text_only rows are stripped
    assert ptb.startswith("no it was n't black monday\n\nbut while")


def test_perplexity_bad_input(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    with pytest.raises(ConfigError, match="neither a file"):
        evaluate.load_ppl_text(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="unknown|neither"):
        evaluate.load_ppl_text("wikitext3")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        evaluate.load_ppl_text(empty)
    with pytest.raises(ConfigError, match="fewer than one window"):
        evaluate.perplexity(model, tok, "short text", seq_len=128)
    with pytest.raises(ConfigError):
        evaluate.perplexity(model, tok, TEXT, seq_len=1)
    with pytest.raises(ConfigError):
        evaluate.perplexity(model, tok, TEXT, seq_len=16, batch_size=0)
    # a named text whose local file is absent falls back to the hub; a failure there (here a
    # simulated offline machine) is reported with both causes
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SlimLLMError, match="not found.*hub fallback failed.*offline"):
        evaluate.load_ppl_text("ptb", tmp_path)
    with pytest.raises(ConfigError, match="offline"):
        evaluate.load_ppl_text("someone/some-text:cfg:test")


# ------------------------------------------------------------------------- task configs

EXPECTED = {
    # task: (docs, doc_to_text of doc 0 (start), choices of doc 0, gold index of doc 0)
    "boolq": (3270, "Ethanol fuel -- All biomass goes through", ["no", "yes"], 0),
    "piqa": (
        1838,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        [
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
            "strips, you will also need to supply it with a water bottle and a food dish.",
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
            "material, you will also need to supply it with a water bottle and a food dish.",
        ],
        0,
    ),
    "hellaswag": (
        1000,
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women",
        [
            "go down a rock and stop.",
            "watch from around a pole vault.",
            "are in the wading pool.",
            "are in the gym practicing to do this pole vault, trying to do their best.",
        ],
        3,
    ),
    "winogrande": (
        1267,
        None,  # multiple inputs: the gold context index, checked below
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        1,
    ),
    "arc_easy": (
        2376,
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
        0,
    ),
    "arc_challenge": (
        1172,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact.",
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        2,
    ),
    "openbookqa": (
        500,
        "A person wants to start saving money so that they can afford a nice vacation at the end of "
        "the year. After looking over their budget and expenses, they decide the best way to save "
        "money is to",
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
        1,
    ),
}


@pytest.fixture(scope="module")
def local_tasks(data_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    return tm.load(list(LOCAL_TASKS))["tasks"]


def test_local_task_names():
    assert set(LOCAL_TASKS) == set(EXPECTED)
    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted(LOCAL_TASKS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_local_task_docs(local_tasks, name):
    n_docs, text, choices, gold = EXPECTED[name]
    task = local_tasks[name]
    docs = task.eval_docs
    assert len(docs) == n_docs
    doc = docs[0]
    assert task.doc_to_choice(doc) == choices
    assert task.config.target_delimiter == " "
    if name == "winogrande":
        assert task.doc_to_text(doc) == gold
        assert task.doc_to_target(doc) == "always got the easier cases."
        assert (doc["sentence"], doc["option1"], doc["option2"], doc["answer"]) == (
            "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "Sarah",
            "Maria",
            "2",
        )
    else:
        assert task.doc_to_text(doc).startswith(text)
        assert task.doc_to_target(doc) == gold
    metrics = [m["metric"] for m in task.config.metric_list]
    assert metrics == (["acc"] if name in ("boolq", "winogrande") else ["acc", "acc_norm"])


def _normalized_config(path: Path) -> dict:
    """A task YAML as plain data, `!function` references reduced to `module.function` and the
    `include:` resolved, for comparing our configs with lm-eval's own."""
    import yaml

    base = path.parent

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        ref = loader.construct_scalar(node)
        if "/lm_eval/tasks/" in str(base / "x"):
            rel = str(base).split("/lm_eval/tasks/")[1].replace("/", ".")
            return f"lm_eval.tasks.{rel}.{ref}"
        return ref

    Loader.add_constructor("!function", function)
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    if "include" in cfg:
        cfg = {**_normalized_config(base / cfg.pop("include")), **cfg}
    return cfg


@pytest.mark.parametrize("name", list(EXPECTED))
def test_local_configs_mirror_lm_eval(name):
    lm_eval = pytest.importorskip("lm_eval")
    own = {
        "piqa": "piqa/piqa.yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
        "boolq": "super_glue/boolq/default.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "winogrande": "winogrande/default.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml",
    }[name]
    theirs = _normalized_config(Path(lm_eval.__file__).parent / "tasks" / own)
    ours = _normalized_config(TASKS_DIR / f"{name}.yaml")
    assert ours["custom_dataset"] == f"slimllm.evaluation.tasks.local_data.load_{name}"
    for key in (
        "task", "dataset_path", "dataset_name", "output_type", "doc_to_text", "doc_to_target",
        "doc_to_choice", "process_docs", "target_delimiter", "metric_list", "metadata",
        "doc_to_decontamination_query", "should_decontaminate",
    ):
        assert ours.get(key) == theirs.get(key), key
    # the same evaluation split as lm-eval (test if it has one, else validation)
    split = lambda c: c.get("test_split") or c.get("validation_split")  # noqa: E731
    assert split(ours) == split(theirs)


def test_loader_reports_missing_files(tmp_path):
    from slimllm.evaluation.tasks import local_data

    for name, loader in local_data.LOADERS.items():
        with pytest.raises(ConfigError, match="not found"):
            loader(data_dir=tmp_path)


# ----------------------------------------------------------------------------- zero-shot


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    """Independent log-likelihood of `continuation` after `context`: tokenize both together,
    the continuation tokens are those after the context's own tokens."""
    ctx = tokenizer(context).input_ids
    whole = tokenizer(context + continuation).input_ids
    ids = torch.tensor(whole)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def _expected_scores(model, tokenizer, docs) -> tuple[float, float]:
    """docs: (list of (context, continuation) per choice, choice strings, gold)."""
    acc = norm = 0
    for pairs, choices, gold in docs:
        lls = [_loglik(model, tokenizer, c, x) for c, x in pairs]
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        normed = [ll / len(ch) for ll, ch in zip(lls, choices)]
        norm += max(range(len(lls)), key=normed.__getitem__) == gold
    return acc / len(docs), norm / len(docs)


def test_zero_shot_scores_as_independent_loglikelihood(tiny, data_dir):
    pytest.importorskip("lm_eval")
    model, tok = tiny
    limit = 6
    raw = [json.loads(x) for x in (data_dir / "piqa" / "valid.jsonl").read_text().splitlines()[:limit]]
    labels = [int(x) for x in (data_dir / "piqa" / "valid-labels.lst").read_text().split()[:limit]]
    piqa = [
        (
            [(f"Question: {d['goal']}\nAnswer:", " " + d[s]) for s in ("sol1", "sol2")],
            [d["sol1"], d["sol2"]],
            y,
        )
        for d, y in zip(raw, labels)
    ]
    arc_raw = [json.loads(x) for x in (data_dir / "arc_easy" / "ARC-Easy-Test.jsonl").read_text().splitlines()[:limit]]
    arc = []
    for d in arc_raw:
        texts = [c["text"] for c in d["question"]["choices"]]
        gold = [c["label"] for c in d["question"]["choices"]].index(d["answerKey"])
        arc.append(([(f"Question: {d['question']['stem']}\nAnswer:", " " + t) for t in texts], texts, gold))
    wino_raw = [
        json.loads(x)
        for x in (data_dir / "winogrande" / "winogrande.llmfoundry.jsonl").read_text().splitlines()[:limit]
    ]
    wino_labels = [int(x) - 1 for x in (data_dir / "winogrande" / "dev-labels.lst").read_text().split()[:limit]]
    wino = [
        ([(c, " " + d["continuation"]) for c in d["context_options"]], d["context_options"], y)
        for d, y in zip(wino_raw, wino_labels)
    ]
    tok_before = copy.deepcopy(tok)
    out = evaluate.zero_shot(
        model, tok, ["piqa", "arc_easy", "winogrande"], limit=limit, batch_size=4, data_dir=data_dir
    )
    assert tok.pad_token == tok_before.pad_token  # the caller's tokenizer is left alone
    for name, docs in (("piqa", piqa), ("arc_easy", arc), ("winogrande", wino)):
        acc, acc_norm = _expected_scores(model, tok, docs)
        r = out["tasks"][name]
        assert r["samples"] == limit
        assert r["acc"] == pytest.approx(acc, abs=1e-12), name
        if name == "winogrande":
            assert r["acc_norm"] is None
        else:
            assert r["acc_norm"] == pytest.approx(acc_norm, abs=1e-12), name
    accs = [out["tasks"][n]["acc"] for n in ("piqa", "arc_easy", "winogrande")]
    assert out["average_acc"] == pytest.approx(sum(accs) / 3)
    norms = [out["tasks"]["piqa"]["acc_norm"], out["tasks"]["arc_easy"]["acc_norm"], out["tasks"]["winogrande"]["acc"]]
    assert out["average_acc_norm"] == pytest.approx(sum(norms) / 3)
    assert out["limit"] == limit


def test_check_tasks(data_dir, tmp_path):
    assert evaluate.check_tasks(["all"], data_dir=data_dir) == list(LOCAL_TASKS)
    assert evaluate.check_tasks("piqa, boolq,piqa", data_dir=data_dir) == ["piqa", "boolq"]
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate.check_tasks(["piqa", "mmlu"], data_dir=data_dir)
    with pytest.raises(ConfigError, match="no zero-shot task"):
        evaluate.check_tasks([""], data_dir=data_dir)
    with pytest.raises(ConfigError, match="not found"):
        evaluate.check_tasks(["piqa"], data_dir=tmp_path)


# ---------------------------------------------------------------------------------- speed


def test_speed_fields(tiny, make_tiny_model):
    model, _ = tiny
    small = make_tiny_model("llama", layers=1, intermediate=32, seed=2)
    a, b = evaluate.compare_speed([model, small], prompt_len=8, new_tokens=3, warmup=1, repeats=2)
    for r in (a, b):
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
        assert len(r.prefill_all_s) == 2 and r.prompt_len == 8 and r.new_tokens == 3
        assert r.memory_kind in ("cpu_peak_rss_delta", "cuda_max_allocated", "unavailable")
    assert a.parameters == sum(p.numel() for p in model.parameters())
    assert b.parameters < a.parameters
    with pytest.raises(ConfigError):
        evaluate.measure_speed(model, prompt_len=0)



def test_median_timings_interleaves_and_takes_medians():
    """Warm-ups of all models first, then timed rounds alternating between them; medians of
    each model's repeats, tokens/s from batch * length over the median."""
    calls = []
    seq = {"a": iter([(9.0, 9.0), (1.0, 4.0), (3.0, 2.0), (2.0, 8.0)]),
           "b": iter([(9.0, 9.0), (5.0, 1.0), (4.0, 3.0), (6.0, 2.0)])}

    def run(name):
        def go():
            calls.append(name)
            return next(seq[name])
        return go

    a, b = evaluate.median_timings([run("a"), run("b")], prompt_len=8, new_tokens=4,
                                   warmup=1, repeats=3, batch_size=2)
    assert calls == ["a", "b"] * 4
    assert a["prefill_all_s"] == [1.0, 3.0, 2.0] and a["decode_all_s"] == [4.0, 2.0, 8.0]
    assert (a["prefill_seconds"], a["decode_seconds"]) == (2.0, 4.0)
    assert (b["prefill_seconds"], b["decode_seconds"]) == (5.0, 2.0)
    assert a["prefill_tokens_per_s"] == 2 * 8 / 2.0 and a["decode_tokens_per_s"] == 2 * 4 / 4.0
    r = evaluate.SpeedResult(**a, peak_memory_bytes=None, memory_kind="unavailable", weight_bytes=1,
                             parameters=1, batch_size=2, device="cpu")
    assert r.to_dict() == {**a, "peak_memory_bytes": None, "memory_kind": "unavailable",
                           "weight_bytes": 1, "parameters": 1, "batch_size": 2, "device": "cpu"}
    assert a["warmup"] == 1 and a["repeats"] == 3 and a["prompt_len"] == 8 and a["new_tokens"] == 4

# ------------------------------------------------------------------------------------ CLI


@pytest.fixture
def fake_load(monkeypatch, make_tiny_model, tiny_tokenizer):
    """Route the command's model loading to tiny models: "dense" gets a larger one."""
    from slimllm.commands import eval as eval_cmd

    def load(source, dtype, device):
        layers = 2 if Path(source).name == "dense" else 1
        return make_tiny_model("llama", layers=layers, seed=3).to(device), copy.deepcopy(tiny_tokenizer)

    monkeypatch.setattr(eval_cmd, "load", load)
    return load


def test_cli_json_output(fake_load, data_dir, text_file, tmp_path, capsys):
    from slimllm.cli import main

    out = tmp_path / "eval.json"
    dense = tmp_path / "dense"
    dense.mkdir()
    rc = main([
        "eval", "--model", "pruned", "--device", "cpu", "--data-dir", str(data_dir),
        "--ppl-file", str(text_file), "--seq-len", "32", "--max-windows", "4",
        "--tasks", "piqa,boolq", "--limit", "2",
        "--compare", str(dense), "--speed-prompt-len", "8", "--speed-new-tokens", "2",
        "--speed-warmup", "0", "--speed-repeats", "1",
        "--json", str(out),
    ])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == "pruned" and report["compare"] == str(dense)
    assert report["settings"]["seq_len"] == 32
    p = report["perplexity"][str(text_file)]
    assert set(p) >= {"ppl", "nll", "tokens", "windows", "seq_len", "source"}
    assert p["windows"] == 4 and p["tokens"] == 4 * 31
    zs = report["zero_shot"]
    assert set(zs["tasks"]) == {"piqa", "boolq"}
    assert set(zs["tasks"]["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    assert zs["tasks"]["boolq"]["acc_norm"] is None
    assert zs["average_acc"] is not None and zs["average_acc_norm"] is not None
    speed = report["speed"]
    assert set(speed["models"]) == {"model", "compare"}
    for r in speed["models"].values():
        assert {"prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "parameters"} <= set(r)
    assert speed["models"]["model"]["parameters"] < speed["models"]["compare"]["parameters"]
    assert 0 < speed["ratio_model_over_compare"]["parameters"] < 1
    table = capsys.readouterr().out
    for needle in ("Perplexity", "Zero-shot", "piqa", "average", "Speed", "decode tok/s"):
        assert needle in table


def test_cli_default_is_wikitext_and_ptb(fake_load, data_dir, tmp_path):
    from slimllm.cli import main

    out = tmp_path / "e.json"
    rc = main(["eval", "--model", "m", "--data-dir", str(data_dir), "--max-windows", "2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["perplexity"]) == ["wikitext2", "ptb"]
    assert report["zero_shot"] is None and report["speed"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ppl-file", "/nonexistent/text.txt"], "no such file"),
        (["--tasks", "piqa,not_a_task"], "unknown task"),
        (["--ppl", "wikitext3"], "unknown text"),
        (["--seq-len", "1"], "seq-len"),
        (["--tasks", "piqa", "--limit", "0"], "limit"),
        (["--tasks", "piqa", "--data-dir", "/nonexistent"], "not found"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
        (["--compare", "/nonexistent/dense"], "CheckpointError"),
        (["--threads", "0"], "threads"),
        (["--ppl", "none"], "nothing to measure"),
    ],
)
def test_cli_bad_input(fake_load, data_dir, argv, message, capsys):
    from slimllm.cli import main

    args = ["eval", "--model", "m", *argv]
    if "--data-dir" not in argv:
        args += ["--data-dir", str(data_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("ConfigError" in err or "CheckpointError" in err) and message in err


def test_cli_with_saved_model(make_tiny_model, tiny_tokenizer, tmp_path, text_file):
    """The real loader on a save_pretrained folder (needs slimllm.io.checkpoint)."""
    pytest.importorskip("slimllm.io.checkpoint")
    from slimllm.cli import main

    model = make_tiny_model("qwen2", seed=4)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(folder), "--device", "cpu", "--ppl-file", str(text_file),
                 "--seq-len", "32", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["perplexity"][str(text_file)]["ppl"]
    ref, _ = reference_ppl(model, tiny_tokenizer, TEXT, 32, None)
    assert got == pytest.approx(ref, rel=1e-4)
