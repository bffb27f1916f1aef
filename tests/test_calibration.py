"""Calibration sequences: sources, determinism under the seed, errors (slimllm.pruning.calibration)."""

from __future__ import annotations

import json

import pytest
import torch

from slimllm.pruning.calibration import CalibrationSet, from_documents, load_calibration, read_documents
from slimllm.errors import CalibrationError

WORDS = (
    "pruning removes attention heads and intermediate channels of a language model while a small "
    "calibration set estimates the statistics that rank them "
).split()


def _doc(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": _doc(i, 60 + 7 * i), "id": i}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_shape_dtype_and_description(tiny_tokenizer, jsonl_file):
    calib = load_calibration(tiny_tokenizer, jsonl_file, num_samples=5, seq_len=16, seed=3)
    assert isinstance(calib, CalibrationSet)
    assert calib.input_ids.shape == (5, 16) and calib.input_ids.dtype == torch.long
    d = calib.description
    assert d["source"] == str(jsonl_file) and d["kind"] == "jsonl" and d["mode"] == "documents"
    assert (d["num_samples"], d["seq_len"], d["seed"]) == (5, 16, 3)
    json.dumps(d)
    assert [b.shape[0] for b in calib.batches(2)] == [2, 2, 1]


def test_deterministic_under_seed(tiny_tokenizer, jsonl_file):
    a = load_calibration(tiny_tokenizer, jsonl_file, num_samples=6, seq_len=12, seed=1)
    b = load_calibration(tiny_tokenizer, jsonl_file, num_samples=6, seq_len=12, seed=1)
    c = load_calibration(tiny_tokenizer, jsonl_file, num_samples=6, seq_len=12, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_windows_are_real_token_spans(tiny_tokenizer, jsonl_file):
    docs, _ = read_documents(jsonl_file)
    encoded = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    calib = load_calibration(tiny_tokenizer, jsonl_file, num_samples=4, seq_len=10, seed=0)
    for row in calib.input_ids.tolist():
        assert any(
            row == ids[s : s + 10] for ids in encoded for s in range(len(ids) - 9)
        ), "each window is a contiguous span of one document"


def test_plain_text_stream_mode(tiny_tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_doc(0, 400), encoding="utf-8")
    calib = load_calibration(tiny_tokenizer, path, num_samples=3, seq_len=20, seed=0)
    assert calib.input_ids.shape == (3, 20)
    assert calib.description["kind"] == "text" and calib.description["mode"] == "stream"
    assert calib.description["tokens_available"] >= 60


def test_short_documents_fall_back_to_stream(tiny_tokenizer, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": _doc(i, 8)}) for i in range(50)), encoding="utf-8")
    calib = load_calibration(tiny_tokenizer, path, num_samples=4, seq_len=32, seed=0)
    assert calib.input_ids.shape == (4, 32)
    assert calib.description["mode"] == "stream"


def test_custom_text_field(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"content": _doc(i, 80)}) for i in range(6)), encoding="utf-8")
    calib = load_calibration(tiny_tokenizer, path, num_samples=2, seq_len=8, text_field="content")
    assert calib.input_ids.shape == (2, 8)
    with pytest.raises(CalibrationError, match="no string field 'text'"):
        load_calibration(tiny_tokenizer, path, num_samples=2, seq_len=8)


def test_shared_c4_sample(tiny_tokenizer, data_dir):
    calib = load_calibration(
        tiny_tokenizer, data_dir / "c4" / "c4_sample.jsonl", num_samples=32, seq_len=128, seed=0
    )
    assert calib.input_ids.shape == (32, 128)
    assert calib.description["mode"] == "documents"


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".txt", "does not exist"),
        (b"", ".txt", "empty"),
        (b"  \n\t\n", ".txt", "empty"),
        (b"", ".jsonl", "empty"),
        (b"\n\n", ".jsonl", "empty"),
        (b"valid start \xff\xfe then garbage", ".txt", "not valid UTF-8 \\(byte 12"),
        (b'{"text": "fine"}\n{"text": broken\n', ".jsonl", "line 2: invalid JSON"),
        (b'{"body": "no text field"}\n', ".jsonl", "line 1: no string field 'text'"),
    ],
)
def test_bad_files(tiny_tokenizer, tmp_path, content, suffix, message):
    path = tmp_path / f"calib{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(tiny_tokenizer, path, num_samples=2, seq_len=8)


def test_too_short_says_found_and_needed(tiny_tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("The quick brown fox.", encoding="utf-8")
    n_tokens = len(tiny_tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"])
    with pytest.raises(CalibrationError, match=rf"{n_tokens} tokens found, 4096 needed \(32 x 128\)"):
        load_calibration(tiny_tokenizer, path, num_samples=32, seq_len=128)


def test_directory_and_bad_counts(tiny_tokenizer, tmp_path):
    with pytest.raises(CalibrationError, match="not a regular file"):
        load_calibration(tiny_tokenizer, tmp_path)
    path = tmp_path / "a.txt"
    path.write_text(_doc(0, 100), encoding="utf-8")
    with pytest.raises(CalibrationError, match="num_samples"):
        load_calibration(tiny_tokenizer, path, num_samples=0)
    with pytest.raises(CalibrationError, match="seq_len"):
        load_calibration(tiny_tokenizer, path, seq_len=-1)
    with pytest.raises(CalibrationError, match="exactly one"):
        load_calibration(tiny_tokenizer)
    with pytest.raises(CalibrationError, match="exactly one"):
        load_calibration(tiny_tokenizer, path, dataset="allenai/c4")


def test_from_documents_in_memory(tiny_tokenizer):
    calib = from_documents(tiny_tokenizer, [_doc(i, 50) for i in range(10)], 3, 10, seed=5)
    assert calib.input_ids.shape == (3, 10)
    with pytest.raises(CalibrationError, match="holds no text"):
        from_documents(tiny_tokenizer, ["", "  "], 1, 4)


def test_hub_dataset_path(tiny_tokenizer, monkeypatch):
    """The hub path goes through datasets.load_dataset (streamed); offline it is replaced."""
    datasets = pytest.importorskip("datasets")
    calls = {}

    def fake_load(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": _doc(i, 70)} for i in range(30)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    calib = load_calibration(tiny_tokenizer, dataset="allenai/c4", dataset_config="en",
                             num_samples=4, seq_len=16, seed=0)
    assert calib.input_ids.shape == (4, 16)
    assert calls == {"name": "allenai/c4", "config": "en", "split": "train", "streaming": True}
    assert calib.description["kind"] == "hub" and calib.description["source"] == "allenai/c4/en:train"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CalibrationError, match="cannot load calibration dataset 'allenai/c4'.*no network"):
        load_calibration(tiny_tokenizer, dataset="allenai/c4", num_samples=2, seq_len=8)


def test_self_generated_is_model_sampled_and_seeded(make_tiny_model, tiny_tokenizer):
    from slimllm.pruning.calibration import self_generated

    model = make_tiny_model("llama", seed=4)
    a = self_generated(model, tiny_tokenizer, num_samples=5, seq_len=12, seed=7, batch_size=2)
    b = self_generated(model, tiny_tokenizer, num_samples=5, seq_len=12, seed=7, batch_size=2)
    c = self_generated(model, tiny_tokenizer, num_samples=5, seq_len=12, seed=8, batch_size=2)
    assert a.input_ids.shape == (5, 12) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert (a.input_ids[:, 1:] != tiny_tokenizer.eos_token_id).all()
    assert a.description["kind"] == "self" and a.description["seed"] == 7
    assert a.description["batch_size"] == 2
    # Sampling follows the model: at a temperature near 0 it is the model's greedy decode.
    cold = self_generated(model, tiny_tokenizer, num_samples=2, seq_len=8, temperature=1e-6)
    prompt = torch.full((2, 1), tiny_tokenizer.bos_token_id)
    logits_first = model(prompt).logits[:, -1]
    logits_first[:, tiny_tokenizer.eos_token_id] = -float("inf")
    assert torch.equal(cold.input_ids[:, 1], logits_first.argmax(-1))
    greedy = model.generate(
        prompt, do_sample=False, max_new_tokens=7, min_new_tokens=7,
        suppress_tokens=[tiny_tokenizer.eos_token_id], pad_token_id=tiny_tokenizer.eos_token_id,
    )
    assert torch.equal(cold.input_ids, greedy)


def test_self_generated_progress_counts_sampled_tokens_and_keeps_the_draw(make_tiny_model, tiny_tokenizer, capsys):
    from slimllm.pruning.calibration import self_generated

    model = make_tiny_model("llama", seed=4)
    quiet = self_generated(model, tiny_tokenizer, num_samples=5, seq_len=12, seed=7, batch_size=2, progress=False)
    assert "self-calibration" not in capsys.readouterr().err
    shown = self_generated(model, tiny_tokenizer, num_samples=5, seq_len=12, seed=7, batch_size=2, progress=True)
    assert torch.equal(quiet.input_ids, shown.input_ids)
    # 5 sequences x 11 sampled tokens, counted step by step over the chunks of 2, 2 and 1
    states = capsys.readouterr().err.replace("\r", "\n").split("\n")
    counts = [line.split("|")[2].split()[0] for line in states if line.startswith("self-calibration:")]
    assert counts[0] == "0/55" and counts[-1] == "55/55"


def test_self_generated_rejects_bad_temperature_and_batch_size(make_tiny_model, tiny_tokenizer):
    from slimllm.pruning.calibration import self_generated

    with pytest.raises(CalibrationError, match="temperature"):
        self_generated(make_tiny_model("llama"), tiny_tokenizer, 2, 8, temperature=0.0)
    for bad in (0, True, 2.0):
        with pytest.raises(CalibrationError, match=f"batch_size must be a positive integer, got {bad!r}"):
            self_generated(make_tiny_model("llama"), tiny_tokenizer, 2, 8, batch_size=bad)
