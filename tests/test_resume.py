"""Resumable prunes (slimllm.pruning.resume, issue 4 item 2): a run killed mid-model continues after
its last finished block and ends with exactly the tensors of an uninterrupted run.

The CLI tests kill a real ``python -m slimllm prune`` process with SIGKILL at chosen points
(a wrapper patches the state writer to kill its own process), then run the same command with
``--resume`` and compare every saved tensor with ``torch.equal``.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from saved import folder_tensors

from slimllm.errors import CheckpointError, ConfigError
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.resume import STATE_NAME, PruneState

REPO = Path(__file__).resolve().parent.parent


class _Interrupt(Exception):
    pass


def _ids(vocab: int, n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def _interrupt_after(monkeypatch, block: int) -> None:
    """Make PruneState.commit raise right after committing ``block``."""
    original = PruneState.commit

    def commit(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == block:
            raise _Interrupt

    monkeypatch.setattr(PruneState, "commit", commit)


def _same_report_layers(a: dict, b: dict) -> None:
    assert a["layers"] == b["layers"]
    assert a["parameters"] == b["parameters"]
    assert a["base_ratio"] == b["base_ratio"]


@pytest.mark.parametrize(
    "arch, heads, kv, config",
    [
        ("llama", 4, 2, dict(ratio=0.3, recovery="affine")),
        ("qwen2", 4, 2, dict(ratio=0.3, recovery="ridge")),  # q/k/v biases + new biases
        ("llama", 8, 4, dict(ratio=0.3, head_mode="kv-group", recovery="none")),
        ("qwen3", 4, 4, dict(ratio=0.25, recovery="ridge-delta")),  # MHA
        ("gemma2", 4, 2, dict(ratio=0.3)),  # new o_proj / down_proj biases, sandwich norms
        ("gemma3_text", 4, 2, dict(ratio=0.3, recovery="ridge")),
        ("phi3", 8, 2, dict(ratio=0.3, head_mode="kv-group", recovery="affine")),  # fused, config view
    ],
    ids=["llama-affine", "qwen2-ridge", "llama-kv-group", "qwen3-mha-ridge-delta", "gemma2-affine",
         "gemma3_text-ridge", "phi3-kv-group-affine"],
)
def test_interrupted_run_resumes_to_identical_tensors(
    make_tiny_model, tmp_path, monkeypatch, arch, heads, kv, config
):
    dense = make_tiny_model(arch, num_heads=heads, num_kv_heads=kv, layers=4)
    calib = _ids(dense.config.vocab_size, seed=4)
    cfg = PruneConfig(batch_size=4, progress=False, **config)
    want, want_report = prune_model(copy.deepcopy(dense), None, calib, cfg)

    state_dir = tmp_path / "state"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(_Interrupt):
            prune_model(copy.deepcopy(dense), None, calib, cfg, state_dir=state_dir)
    manifest = json.loads((state_dir / STATE_NAME).read_text())
    assert manifest["finished"] == 2 and len(manifest["entries"]) == 2
    # only the latest hidden states and the dense references still needed are kept
    assert sorted(p.name for p in state_dir.glob("hidden-*")) == ["hidden-0002.safetensors"]
    assert sorted(p.name for p in state_dir.glob("dense-*")) == [
        "dense-0002.safetensors",
        "dense-0003.safetensors",
    ]

    got, got_report = prune_model(copy.deepcopy(dense), None, calib, cfg, state_dir=state_dir)
    assert got_report["resumed_from_block"] == 2
    _same_report_layers(got_report, want_report)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key
    probe = _ids(dense.config.vocab_size, n=2, seed=8)
    with torch.no_grad():
        assert torch.equal(got(input_ids=probe).logits, want(input_ids=probe).logits)


def test_state_of_a_finished_run_gives_the_result_without_pruning_again(make_tiny_model, tmp_path):
    dense = make_tiny_model("llama", layers=3)
    calib = _ids(dense.config.vocab_size)
    cfg = PruneConfig(ratio=0.3, progress=False)
    first, report = prune_model(copy.deepcopy(dense), None, calib, cfg, state_dir=tmp_path / "s")
    assert "resumed_from_block" not in report
    again, again_report = prune_model(
        copy.deepcopy(dense), None, calib, cfg, state_dir=tmp_path / "s"
    )
    assert again_report["resumed_from_block"] == 3
    _same_report_layers(again_report, report)
    for key, value in first.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_resume_with_other_model_calibration_or_settings_is_refused(
    make_tiny_model, tmp_path, monkeypatch
):
    dense = make_tiny_model("llama", layers=3)
    calib = _ids(dense.config.vocab_size)
    state_dir = tmp_path / "state"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 0)
        with pytest.raises(_Interrupt):
            prune_model(
                copy.deepcopy(dense),
                None,
                calib,
                PruneConfig(ratio=0.3, progress=False),
                state_dir=state_dir,
            )
    before = (state_dir / STATE_NAME).read_bytes()
    cases = [
        (
            dense,
            calib,
            PruneConfig(ratio=0.3, alpha=5.0, progress=False),
            "alpha (10.0 recorded, 5.0 now)",
        ),
        (
            dense,
            _ids(dense.config.vocab_size, seed=9),
            PruneConfig(ratio=0.3, progress=False),
            "calibration token ids",
        ),
        (
            make_tiny_model("llama", layers=3, seed=1),
            calib,
            PruneConfig(ratio=0.3, progress=False),
            "model weights",
        ),
    ]
    for model, ids, cfg, what in cases:
        model = copy.deepcopy(model)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ConfigError, match="cannot resume") as err:
            prune_model(model, None, ids, cfg, state_dir=state_dir)
        assert what in str(err.value)
        # refused before any weight changed, and the recorded state is untouched
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        assert (state_dir / STATE_NAME).read_bytes() == before
    # progress and device do not change what is computed: resuming with them changed works
    _, report = prune_model(
        copy.deepcopy(dense),
        None,
        calib,
        PruneConfig(ratio=0.3, progress=True),
        state_dir=state_dir,
    )
    assert report["resumed_from_block"] == 1


def test_a_folder_that_is_not_a_state_is_never_used(tmp_path, make_tiny_model):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a slimllm resume state"):
        PruneState.open(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        PruneState.open(tmp_path / "file")
    (folder / "notes.txt").unlink()
    (folder / STATE_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        PruneState.open(folder)
    dense = make_tiny_model("llama", layers=2)
    with pytest.raises(CheckpointError, match="unreadable"):
        prune_model(
            dense,
            None,
            _ids(dense.config.vocab_size),
            PruneConfig(ratio=0.2, progress=False),
            state_dir=folder,
        )


# ---------------------------------------------------------------------------------------------
# the CLI, killed with SIGKILL

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from slimllm.pruning import resume

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    where, arg = sys.argv[1], sys.argv[2]
    if where == "after-commit":  # block `arg` fully committed
        commit = resume.PruneState.commit
        def patched(self, index, *a, **k):
            commit(self, index, *a, **k)
            if index == int(arg):
                die()
        resume.PruneState.commit = patched
    elif where == "at-file":  # state file `arg` written, the manifest not yet updated
        write = resume.PruneState._write_tensors
        def patched(self, name, tensors):
            write(self, name, tensors)
            if name == arg:
                die()
        resume.PruneState._write_tensors = patched
    else:  # "in-save": the output's temporary folder is complete but not yet renamed
        chmod = os.chmod
        def patched(path, *a, **k):
            if "slimllm-tmp" in os.fspath(path):
                die()
            return chmod(path, *a, **k)
        os.chmod = patched
    from slimllm.cli import main
    sys.exit(main(["prune", *sys.argv[3:]]))
    """
)


def _prune_cli(args, killer=None):
    cmd = [sys.executable, "-m", "slimllm", "prune", *map(str, args)]
    if killer is not None:
        cmd = [sys.executable, "-c", _KILLER, *killer, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, make_tiny_model, tiny_tokenizer):
    """A saved 4-layer tiny Llama, a calibration file and an uninterrupted CLI prune of it."""
    root = tmp_path_factory.mktemp("resume-cli")
    dense = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=4)
    dense.save_pretrained(root / "dense")
    tiny_tokenizer.save_pretrained(root / "dense")
    calib = root / "calib.txt"
    calib.write_text(
        "Resumable pruning keeps every finished block on disk. " * 80, encoding="utf-8"
    )
    args = [
        "--model",
        root / "dense",
        "--ratio",
        0.3,
        "--calib-file",
        calib,
        "--num-samples",
        6,
        "--seq-len",
        24,
        "--batch-size",
        4,
        "--no-progress",
    ]
    run = _prune_cli([*args, "--output", root / "reference"])
    assert run.returncode == 0, run.stderr
    return root, args


@pytest.mark.parametrize(
    "killer, finished",
    [
        (("after-commit", "1"), 2),
        (("at-file", "hidden-0003.safetensors"), 2),  # block 2 written, not yet committed
        (("at-file", "dense-0001.safetensors"), None),  # still setting up: nothing to resume
        (("at-file", "block-0000.safetensors"), 0),  # set up, block 0 not yet committed
        (("after-commit", "3"), 4),  # every block done, killed before saving
        (("in-save", "-"), 4),  # killed while writing the output's temporary folder
    ],
    ids=[
        "after-block-1",
        "mid-block-2",
        "during-setup",
        "mid-block-0",
        "before-save",
        "during-save",
    ],
)
def test_sigkilled_cli_run_resumes_to_identical_output(cli_setup, tmp_path, killer, finished):
    root, args = cli_setup
    out = tmp_path / "pruned"
    state_dir = tmp_path / "pruned.partial"
    run = _prune_cli([*args, "--output", out], killer=killer)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists()  # the output folder is never half written
    manifest = json.loads((state_dir / STATE_NAME).read_text())
    if finished is None:
        assert manifest["phase"] == "starting"
    else:
        assert manifest["phase"] == "blocks" and manifest["finished"] == finished
    if killer[0] == "in-save":
        assert list(tmp_path.glob(".pruned.slimllm-tmp-*"))

    again = _prune_cli([*args, "--output", out])
    assert again.returncode == 2 and "add --resume" in again.stderr
    assert "pruned.partial holds the state of an interrupted run" in again.stderr
    resumed = _prune_cli([*args, "--output", out, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    if finished is not None:
        restored = f"blocks 0-{finished - 1}" if finished else "the dense pass"
        assert f"resumed at block {finished}: {restored} came from" in resumed.stdout
    assert not state_dir.exists()
    assert not list(tmp_path.glob(".pruned.slimllm-tmp-*"))

    want, got = folder_tensors(root / "reference"), folder_tensors(out)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert (out / "config.json").read_text() == (root / "reference" / "config.json").read_text()
    report = json.loads((out / "slimllm_report.json").read_text())
    want_report = json.loads((root / "reference" / "slimllm_report.json").read_text())
    _same_report_layers(report, want_report)


def test_cli_resume_with_other_settings_is_refused_before_loading(cli_setup, tmp_path):
    root, args = cli_setup
    out = tmp_path / "pruned"
    assert _prune_cli([*args, "--output", out], killer=("after-commit", "1")).returncode < 0
    before = (tmp_path / "pruned.partial" / STATE_NAME).read_bytes()
    # the model path is made unreadable: the refusal must come before the model is loaded
    moved = [a if a != root / "dense" else tmp_path / "gone" for a in args]
    run = _prune_cli([*moved, "--output", out, "--resume", "--alpha", 5])
    assert run.returncode == 2
    assert "cannot resume" in run.stderr and "alpha (10.0 recorded, 5.0 now)" in run.stderr
    assert "finished blocks are kept" not in run.stderr  # nothing new was kept by this run
    assert (tmp_path / "pruned.partial" / STATE_NAME).read_bytes() == before


def test_cli_failure_mid_model_keeps_the_state_and_says_so(cli_setup, tmp_path):
    """A run that fails after some blocks (here a core error injected in block 2) keeps
    its finished blocks and tells how to continue."""
    root, args = cli_setup
    script = textwrap.dedent(
        """
        import sys
        from slimllm import _core
        from slimllm.errors import NonFiniteError
        select, calls = _core.select_channels, []
        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise NonFiniteError("injected")
            return select(*a, **k)
        _core.select_channels = failing
        from slimllm.cli import main
        sys.exit(main(["prune", *sys.argv[1:]]))
        """
    )
    out = tmp_path / "pruned"
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, args), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 2, run.stderr
    assert "NonFiniteError: layer 2" in run.stderr and "injected" in run.stderr
    assert f"finished blocks are kept in {tmp_path / 'pruned.partial'}" in run.stderr
    assert json.loads((tmp_path / "pruned.partial" / STATE_NAME).read_text())["finished"] == 2
    assert not out.exists()


def test_cli_resume_without_state_starts_afresh(cli_setup, tmp_path):
    root, args = cli_setup
    run = _prune_cli([*args, "--output", tmp_path / "fresh", "--resume"])
    assert run.returncode == 0, run.stderr
    assert "resumed" not in run.stdout
    want, got = folder_tensors(root / "reference"), folder_tensors(tmp_path / "fresh")
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert not (tmp_path / "fresh.partial").exists()
