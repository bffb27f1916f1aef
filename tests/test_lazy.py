"""Block-at-a-time model access (slimllm.io.lazy, issue 11 items 1-2): lazily materialised
blocks equal transformers' loaders, a lazy prune equals the eager one, the source dtype is
kept, resume is exact, and bad input gets typed errors before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from saved import folder_tensors

from slimllm.errors import CheckpointError, ConfigError
from slimllm.io import gguf_export
from slimllm.io import lazy as lazy_module
from slimllm.io.checkpoint import load_model
from slimllm.io.lazy import LazyCheckpoint, open_lazy, supports_lazy
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.resume import PruneState

REPO = Path(__file__).resolve().parent.parent


def _ids(vocab: int, n: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _sharded_bf16(make_tiny_model, tiny_tokenizer, folder: Path, arch="llama", **kw) -> Path:
    """A tiny random model saved as bf16 safetensors in several shards (with an index)."""
    model = make_tiny_model(arch, layers=3, **kw).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _blocks_equal(lazy, reference: torch.nn.Module, layers) -> None:
    ref = reference.state_dict()
    for i in layers:
        block = lazy.load_block(i)
        prefix = lazy._prefixes[i]
        for name, param in block.named_parameters():
            assert param.dtype == torch.float32
            assert torch.equal(param, ref[prefix + name].float()), (i, name)
        lazy.release_block(i)
        assert all(p.is_meta for p in block.parameters())
    lazy.load_outer()
    for name, param in lazy.model.named_parameters():
        if not any(name.startswith(p) for p in lazy._prefixes):
            assert torch.equal(param, ref[name].float()), name
    lazy.release_outer()
    assert all(p.is_meta for p in lazy.model.parameters())



def test_every_release_returns_the_freed_heap(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """release_block, release_outer and a finished tensors() read each trim the heap once
    (the one place the pipeline's walk, its resume and its fingerprint give memory back)."""
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "m")
    lazy, _ = open_lazy(folder)
    trims = []
    monkeypatch.setattr(lazy_module, "return_freed_memory", lambda: trims.append(len(trims)))
    lazy.load_block(1)
    lazy.release_block(1)
    assert trims == [0]
    lazy.load_outer()
    lazy.release_outer()
    assert trims == [0, 1]
    names = [name for name, _ in lazy.tensors()]
    assert names == [name for name, _ in lazy.model.named_parameters()] and trims == [0, 1, 2]


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_lazy_blocks_equal_from_pretrained(make_tiny_model, tiny_tokenizer, tmp_path, arch, tied):
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / arch, arch, tied=tied)
    assert supports_lazy(folder)
    lazy, _ = open_lazy(folder)
    assert lazy.source_dtype == lazy.dtype == torch.bfloat16
    assert all(p.is_meta for p in lazy.model.parameters())
    assert not any(b.is_meta for b in lazy.model.buffers())  # rotary inv_freq is real
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    _blocks_equal(lazy, reference, range(3))
    if tied:
        lazy.load_outer()
        assert lazy.model.lm_head.weight is lazy.model.get_input_embeddings().weight


@pytest.mark.parametrize("arch, kw", [
    ("llama", dict(ratio=0.3)),
    ("qwen2", dict(ratio=0.3, recovery="affine")),
    ("mistral", dict(ratio=0.3, head_mode="kv-group", recovery="ridge")),
    ("phi3", dict(ratio=0.3, recovery="ridge-delta")),  # fused qkv_proj / gate_up_proj
])
def test_lazy_prune_equals_eager_prune(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch,
                                       arch, kw):
    """Both in float32 from the same bf16 checkpoint: same choices, identical tensors; and
    the lazy run never holds more than one dense block."""
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / arch, arch,
                           num_heads=4, num_kv_heads=2)
    config = PruneConfig(progress=False, batch_size=4, **kw)
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _ids(eager.config.vocab_size)
    eager, eager_report = prune_model(eager, None, ids, config)

    lazy, _ = open_lazy(folder, dtype="float32")
    kept: list = []
    load, keep = LazyCheckpoint.load_block, LazyCheckpoint.keep_block

    def load_block(self, index, device="cpu"):
        dense = [i for i, layer in enumerate(self.adapter.layers(self.model))
                 if not next(layer.parameters()).is_meta and i not in kept]
        assert dense == [], f"dense blocks {dense} still materialised when loading {index}"
        return load(self, index, device)

    def keep_block(self, index):
        kept.append(index)
        keep(self, index)

    monkeypatch.setattr(LazyCheckpoint, "load_block", load_block)
    monkeypatch.setattr(LazyCheckpoint, "keep_block", keep_block)
    model, report = prune_model(lazy.model, None, ids, config, lazy=lazy)
    assert kept == [0, 1, 2]
    assert report["layers"] == eager_report["layers"]
    assert report["parameters"] == eager_report["parameters"]
    ref = eager.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def _calib_file(path: Path) -> Path:
    path.write_text("Block by block pruning reads one decoder block at a time. " * 80, encoding="utf-8")
    return path


def _cli(*args):
    """The installed package's CLI (the tests' interpreter), as tests/test_pipeline.py runs it."""
    cmd = [sys.executable, "-m", "slimllm", "prune", *map(str, args), "--num-samples", "8",
           "--seq-len", "24", "--batch-size", "4", "--no-progress", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_cli_keeps_the_source_dtype_and_matches_eager(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "dense")
    calib = _calib_file(tmp_path / "calib.txt")
    run = _cli("--model", folder, "--output", tmp_path / "bf16", "--ratio", 0.3, "--calib-file", calib)
    assert run.returncode == 0, run.stderr
    saved = folder_tensors(tmp_path / "bf16")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    import json

    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    run = _cli("--model", folder, "--output", tmp_path / "f32", "--ratio", 0.3, "--calib-file", calib,
               "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    f32 = folder_tensors(tmp_path / "f32")
    assert f32.keys() == saved.keys()
    for name, t in f32.items():  # the bf16 run is the float32 one rounded once at the end
        assert t.dtype == torch.float32 and torch.equal(t.to(torch.bfloat16), saved[name]), name


def test_missing_shard_is_found_at_open(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "dense")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        open_lazy(folder)
    run = _cli("--model", folder, "--output", tmp_path / "out", "--ratio", 0.3,
               "--calib-file", _calib_file(tmp_path / "calib.txt"))
    assert run.returncode != 0 and shard.name in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_truncated_shard_is_found_when_its_block_is_reached(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "dense")
    lazy, _ = open_lazy(folder)  # opens fine: shards are read when their block is needed
    last = lazy._prefixes[-1]
    shard = next(p for n, p in lazy._source.files.items() if n.startswith(last))
    os.truncate(shard, shard.stat().st_size - 64)
    lazy, _ = open_lazy(folder)
    lazy.load_block(0)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*corrupt"):
        lazy.load_block(len(lazy._prefixes) - 1)
    run = _cli("--model", folder, "--output", tmp_path / "out", "--ratio", 0.3,
               "--calib-file", _calib_file(tmp_path / "calib.txt"))
    assert run.returncode != 0 and shard.name in run.stderr
    assert not (tmp_path / "out").exists()
    if (tmp_path / "out.partial").exists():  # the state (if any) is still a usable state
        PruneState.open(tmp_path / "out.partial")


def test_compute_dtype_other_than_float32_refused_on_cpu(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "dense")
    with pytest.raises(ConfigError, match="float32 on CPU"):
        open_lazy(folder, compute_dtype="bfloat16")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_lazy_resume_gives_identical_tensors(make_tiny_model, tiny_tokenizer, tmp_path, monkeypatch, arch):
    """A lazy prune with a state drops each block once committed (meta), resumes after an
    interruption, and its streamed output (save_pruned_from_state) holds exactly the tensors
    save_pruned writes for the same prune kept in memory (phi3: the layout planned from fused
    modules' biases)."""
    from slimllm.io.checkpoint import save_pruned
    from slimllm.io.streaming import save_pruned_from_state

    folder = _sharded_bf16(make_tiny_model, tiny_tokenizer, tmp_path / "dense", arch)
    config = PruneConfig(ratio=0.3, progress=False, batch_size=4)
    lazy, _ = open_lazy(folder)
    ids = _ids(lazy.model.config.vocab_size)
    reference, ref_report = prune_model(lazy.model, None, ids, config, lazy=lazy)

    class Interrupt(Exception):
        pass

    original = PruneState.commit

    def commit(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 1:
            raise Interrupt

    monkeypatch.setattr(PruneState, "commit", commit)
    lazy, _ = open_lazy(folder)
    with pytest.raises(Interrupt):
        prune_model(lazy.model, None, ids, config, state_dir=tmp_path / "state", lazy=lazy)
    monkeypatch.setattr(PruneState, "commit", original)
    lazy, _ = open_lazy(folder)
    resumed, report = prune_model(lazy.model, None, ids, config, state_dir=tmp_path / "state", lazy=lazy)
    assert report["resumed_from_block"] == 2
    assert report["layers"] == ref_report["layers"]
    assert all(p.is_meta for p in resumed.model.layers.parameters())  # streamed, not kept
    save_pruned(reference, None, tmp_path / "ref", ref_report)
    save_pruned_from_state(resumed, None, tmp_path / "got", report, PruneState.open(tmp_path / "state"))

    ref, got = folder_tensors(tmp_path / "ref"), folder_tensors(tmp_path / "got")
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], ref[name]), name
    assert len(list((tmp_path / "got").glob("*.safetensors"))) == len(resumed.model.layers) + 1


# ----------------------------------------------------------------------------------------------
# GGUF


def _tiny_gguf(make_tiny_model, tiny_tokenizer, tmp_path: Path, outtype: str) -> Path:
    folder = tmp_path / "dense"
    make_tiny_model("llama", layers=2, num_heads=4, num_kv_heads=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return gguf_export.export_gguf(folder, tmp_path / f"tiny-{outtype}.gguf", outtype=outtype)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_lazy_gguf_blocks_equal_transformers_loader(make_tiny_model, tiny_tokenizer, tmp_path, outtype):
    path = _tiny_gguf(make_tiny_model, tiny_tokenizer, tmp_path, outtype)
    lazy, _ = open_lazy(path)
    assert lazy.source_dtype == torch.float32
    reference, _ = load_model(path)
    _blocks_equal(lazy, reference, range(2))


def test_gguf_tensor_of_an_unsupported_quantisation_type(make_tiny_model, tiny_tokenizer, tmp_path,
                                                         monkeypatch):
    import gguf

    convert = gguf_export._convert

    def as_int8(name, data, qtype_name):
        if name == "blk.1.ffn_up.weight":  # a real I8 tensor, which gguf-py cannot dequantise
            return np.clip(np.round(data * 100), -127, 127).astype(np.int8), gguf.GGMLQuantizationType.I8
        return convert(name, data, qtype_name)

    monkeypatch.setattr(gguf_export, "_convert", as_int8)
    path = _tiny_gguf(make_tiny_model, tiny_tokenizer, tmp_path, "f32")
    lazy, _ = open_lazy(path)
    lazy.load_block(0)
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight.*I8"):
        lazy.load_block(1)


@pytest.mark.slow
def test_lazy_gguf_blocks_equal_transformers_loader_on_smollm2(smollm2_gguf):
    lazy, _ = open_lazy(smollm2_gguf)
    reference, _ = load_model(smollm2_gguf)
    _blocks_equal(lazy, reference, (0, 14, 29))
