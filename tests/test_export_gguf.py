"""GGUF export (slimllm.io.gguf_export, ``python -m slimllm export``).

Without llama.cpp: tiny pruned models with per-layer shapes written to GGUF and read back with
``gguf.GGUFReader``: per-layer head / KV-head / FFN arrays equal the layer shapes, every
tensor equals the model's after undoing the RoPE row permutation (brute force, head by head),
recovery biases present; typed errors leave no file behind.

With llama-cpp-python (stock llama.cpp, driven by slimllm.evaluation.llamacpp): the exported file loads, its logits on the same token
ids match transformers' (float32 export: max abs diff < 1e-3 on the tiny model, same argmax at
every position), tokenizer ids match; slow: SmolLM2 pruned by 20% with per-layer shapes,
logits and WikiText-2 perplexity (64 windows of 128 tokens) within 1% of slimllm's own.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

from conftest import require
from slimllm.errors import CheckpointError, ConfigError, MissingDependencyError, UnsupportedArchitectureError
from slimllm.evaluation import llamacpp
from slimllm.io.checkpoint import load_pruned, load_tokenizer, save_pruned
from slimllm.io.gguf_export import export_gguf
from slimllm.pruning.pipeline import PruneConfig, prune_model

TEXT = "The quick brown fox jumps over the lazy dog. Perplexity measures how well a model predicts text."


#: a Phi-3 the GGUF archs hold exactly: whole-head RoPE (the tiny default is Phi-4-mini's 0.75)
PHI3 = dict(partial_rotary_factor=1.0)


def _pruned_folder(make_tiny_model, tokenizer, tmp_path, arch="llama", ratios=(0.2, 0.5, 0.3), extras=None,
                   tied=False):
    model = make_tiny_model(arch, num_heads=4, num_kv_heads=2, layers=len(ratios), extras=extras, tied=tied)
    ids = torch.randint(0, model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    model, report = prune_model(model, tokenizer, ids, PruneConfig(layer_ratios=list(ratios), progress=False))
    # not named after the family: llama.cpp's vocabulary loader special-cases a general.name
    # (the folder's name) containing "phi3" and looks up a "<|end|>" token the tiny tokenizer lacks
    return save_pruned(model, tokenizer, tmp_path / "tiny-pruned", report)


def _fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def _unpermute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Brute-force inverse of llama.cpp's RoPE row order: GGUF row 2j of a head is HF row j,
    row 2j+1 is HF row j + head_dim/2."""
    out = np.empty_like(rows)
    half = head_dim // 2
    for start in range(0, rows.shape[0], head_dim):
        for j in range(half):
            out[start + j] = rows[start + 2 * j]
            out[start + half + j] = rows[start + 2 * j + 1]
    return out


def _gguf_tensors(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))), t.tensor_type.name)
    return reader, tensors


def _hf_name(key: str) -> tuple[str, bool]:
    """(GGUF name of an HF state-dict key, whether its rows are RoPE-permuted), hand-written
    here on purpose (independent of gguf's name map)."""
    parts = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    if key == "model.embed_tokens.weight":
        return "token_embd.weight", False
    if key == "model.norm.weight":
        return "output_norm.weight", False
    if key == "lm_head.weight":
        return "output.weight", False
    _, _, idx, *rest = key.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    return f"blk.{idx}.{parts[module]}.{suffix}", module in ("self_attn.q_proj", "self_attn.k_proj")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_layer_export_round_trip(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path, arch)
    out = export_gguf(folder, tmp_path / "model.gguf")
    model = load_pruned(folder)
    shapes = [(layer.self_attn.q_proj.out_features // 16, layer.self_attn.k_proj.out_features // 16,
               layer.mlp.gate_proj.out_features) for layer in model.model.layers]
    assert len(set(shapes)) > 1  # really per-layer
    reader, tensors = _gguf_tensors(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [s[0] for s in shapes]
    assert fields["deci.attention.head_count_kv"] == [s[1] for s in shapes]
    assert fields["deci.feed_forward_length"] == [s[2] for s in shapes]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 16
    assert fields["deci.block_count"] == 3 and fields["deci.embedding_length"] == 64
    state = model.state_dict()
    assert len(tensors) == len(state)
    for key, value in state.items():
        name, permuted = _hf_name(key)
        data, qtype = tensors[name]
        assert qtype == "F32"
        expected = value.numpy()
        np.testing.assert_array_equal(_unpermute(data, 16) if permuted else data, expected, err_msg=key)
    biases = {name for name in tensors if name.endswith(".bias")}
    assert {"blk.1.attn_output.bias", "blk.1.ffn_down.bias", "blk.2.ffn_down.bias"} <= biases
    if arch == "qwen2":
        assert {f"blk.{i}.attn_{p}.bias" for i in range(3) for p in "qkv"} <= biases
    assert sorted(os.listdir(tmp_path)) == sorted([folder.name, "model.gguf"])


def test_phi3_fused_projections_split_into_llama_tensors(make_tiny_model, tiny_tokenizer, tmp_path):
    """Per-layer Phi-3: qkv_proj rows are attn_q | attn_k | attn_v (q, k RoPE-permuted),
    gate_up_proj rows ffn_gate | ffn_up, every other tensor as for llama; the sliding window caps
    the context length."""
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path, "phi3",
                            extras={**PHI3, "sliding_window": 100})
    out = export_gguf(folder, tmp_path / "model.gguf")
    model = load_pruned(folder)
    reader, tensors = _gguf_tensors(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci" and fields["deci.context_length"] == 100
    heads = [tensors[f"blk.{i}.attn_q.weight"][0].shape[0] // 16 for i in range(3)]
    kv = [tensors[f"blk.{i}.attn_k.weight"][0].shape[0] // 16 for i in range(3)]
    ffn = [tensors[f"blk.{i}.ffn_gate.weight"][0].shape[0] for i in range(3)]
    assert (fields["deci.attention.head_count"], fields["deci.attention.head_count_kv"],
            fields["deci.feed_forward_length"]) == (heads, kv, ffn)
    assert len(set(zip(heads, kv, ffn))) > 1  # really per-layer
    seen = set()
    for key, value in model.state_dict().items():
        expected = value.numpy()
        if ".qkv_proj." in key or ".gate_up_proj." in key:
            idx, suffix = key.split(".")[2], key.rsplit(".", 1)[1]
            parts = ("attn_q", "attn_k", "attn_v") if ".qkv_proj." in key else ("ffn_gate", "ffn_up")
            names = [f"blk.{idx}.{p}.{suffix}" for p in parts]
            rows = [_unpermute(tensors[n][0], 16) if n.split(".")[2] in ("attn_q", "attn_k") else tensors[n][0]
                    for n in names]
            np.testing.assert_array_equal(np.concatenate(rows), expected, err_msg=key)
        else:
            names = [_hf_name(key)[0]]
            np.testing.assert_array_equal(tensors[names[0]][0], expected, err_msg=key)
        seen.update(names)
    assert seen == set(tensors)


def test_uniform_hf_folder_keeps_llama_arch(make_tiny_model, tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama", tied=True)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer.save_pretrained(tmp_path / "dense")
    out = export_gguf(tmp_path / "dense", tmp_path / "dense.gguf")
    reader, tensors = _gguf_tensors(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 96
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert fields["tokenizer.ggml.merges"]


def test_q8_0_and_f16_types(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    state = load_pruned(folder).state_dict()
    for outtype, wide in (("q8_0", "Q8_0"), ("f16", "F16"), ("bf16", "BF16")):
        _, tensors = _gguf_tensors(export_gguf(folder, tmp_path / f"{outtype}.gguf", outtype=outtype))
        for key, value in state.items():
            name, permuted = _hf_name(key)
            data, qtype = tensors[name]
            data = _unpermute(data, 16) if permuted else data
            w = value.numpy()
            if w.ndim == 1:
                assert qtype == "F32"
                np.testing.assert_array_equal(data, w)
                continue
            # Q8_0 needs rows of whole 32-blocks; the converter falls back to F16 otherwise
            assert qtype == (wide if outtype != "q8_0" or w.shape[1] % 32 == 0 else "F16"), key
            if qtype == "Q8_0":
                # per block d = amax/127 stored as f16 (relative error <= 2^-11), |q| <= 127:
                # |x - q*d_f16| <= d/2 + 127 * d * 2^-11
                d = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2, keepdims=True) / 127
                bound = d * (0.5 + 127 / 2048) + 1e-8
                assert (np.abs(data - w).reshape(w.shape[0], -1, 32) <= bound).all(), key
            else:
                ref = torch.from_numpy(w).to(torch.float16 if qtype == "F16" else torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(data, ref, err_msg=key)


def test_bad_input_raises_typed_errors_and_leaves_nothing(make_tiny_model, tiny_tokenizer, tmp_path):
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="outtype 'q4'"):
        export_gguf(folder, tmp_path / "a.gguf", outtype="q4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        export_gguf(tmp_path / "empty", tmp_path / "a.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="already exists"):
        export_gguf(folder, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    qwen3 = make_tiny_model("qwen3")
    qwen3.save_pretrained(tmp_path / "qwen3")
    with pytest.raises(UnsupportedArchitectureError, match="'qwen3'"):
        export_gguf(tmp_path / "qwen3", tmp_path / "a.gguf")
    assert sorted(os.listdir(tmp_path)) == sorted([folder.name, "empty", "exists.gguf", "qwen3"])


def test_cli_export(make_tiny_model, tiny_tokenizer, tmp_path, capsys):
    from slimllm.cli import main

    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    assert main(["export", str(folder), "--format", "gguf", "--outtype", "f16", "--output", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").is_file()
    # the mode a plain open() gives (the temporary file it was written to was private)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~umask
    assert main(["export", str(folder), "--outtype", "f64", "--output", str(tmp_path / "n.gguf")]) == 2
    assert "ConfigError" in capsys.readouterr().err and not (tmp_path / "n.gguf").exists()


# ----------------------------------------------------------------------------------------------
# in llama.cpp itself


def _llama_cpp():
    require(importlib.util.find_spec("llama_cpp") is not None,
            "package llama-cpp-python (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python)")
    llama_cpp = llamacpp.import_llama_cpp()
    print(f"llama-cpp-python {llama_cpp.__version__}")
    return llama_cpp


def _load(path, windows):
    return llamacpp.load_gguf(path, n_ctx=int(windows.shape[1]), n_threads=2, logits_all=True)


@pytest.mark.parametrize("arch", ["llama", "phi3", "granite"])
def test_tiny_model_in_llama_cpp(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    """Per-layer tiny models in llama.cpp: llama; phi3 (fused projections split); granite
    (multipliers 3.0 / 0.2 / 0.5 / 2.5 folded into the weights, tied embeddings: the folded
    lm_head is written as its own output.weight)."""
    llama_cpp = _llama_cpp()
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path, arch, extras=PHI3 if arch == "phi3" else None,
                            tied=arch == "granite")
    out = export_gguf(folder, tmp_path / "model.gguf")
    model = load_pruned(folder)
    ids = tiny_tokenizer(TEXT, add_special_tokens=False).input_ids
    windows = np.array([ids[:20]])
    llm = _load(out, windows)
    logits = llamacpp.window_logits(llm, windows)
    with torch.no_grad():
        ref = model(torch.tensor(windows)).logits.numpy()
    diff = float(np.abs(logits - ref).max())
    print(f"tiny per-layer {arch}: max |logits llama.cpp - transformers| = {diff:.2e}")
    assert diff < 1e-3
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids


def test_llamacpp_perplexity_and_speed(make_tiny_model, tiny_tokenizer, tmp_path):
    """llamacpp.perplexity over tokenize_windows windows equals exp(mean NLL) of transformers
    on the same windows (f32 export, 1e-4); compare_speed reports medians of its repeats."""
    from slimllm.evaluation.evaluate import tokenize_windows, window_nll

    _llama_cpp()
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    out = export_gguf(folder, tmp_path / "model.gguf")
    windows = tokenize_windows(tiny_tokenizer, TEXT * 4, 16, 5)
    got = llamacpp.perplexity(out, windows, n_threads=2)
    want = math.exp(window_nll(load_pruned(folder), windows).mean().item())
    assert (got.windows, got.seq_len, got.tokens) == (5, 16, 75)
    assert got.ppl == pytest.approx(want, rel=1e-4)
    llms = [llamacpp.load_gguf(out, n_ctx=32, n_threads=1) for _ in range(2)]
    speeds = llamacpp.compare_speed(llms, prompt_len=8, new_tokens=4, repeats=3)
    for s in speeds:
        assert len(s.prefill_all_s) == len(s.decode_all_s) == 3 and s.threads == 1
        assert s.decode_tokens_per_s == pytest.approx(4 / sorted(s.decode_all_s)[1])
        assert s.prefill_tokens_per_s == pytest.approx(8 / sorted(s.prefill_all_s)[1])
    with pytest.raises(ConfigError, match="context of"):
        llamacpp.compare_speed(llms, prompt_len=llms[0].n_ctx(), new_tokens=1)
    with pytest.raises(ConfigError, match="logits_all"):
        llamacpp.window_nll(llms[0], windows.numpy())
    with pytest.raises(CheckpointError, match="not found"):
        llamacpp.load_gguf(tmp_path / "none.gguf", n_ctx=8)


def test_llamacpp_missing_package_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match="llama-cpp-python"):
        llamacpp.load_gguf("any.gguf", n_ctx=8)


@pytest.mark.slow
def test_smollm2_pruned_in_llama_cpp(smollm2_gguf, data_dir, tmp_path):
    from slimllm.cli import main
    from slimllm.evaluation.evaluate import load_ppl_text, tokenize_windows, window_nll

    llama_cpp = _llama_cpp()
    folder = tmp_path / "smollm2-pruned"
    assert main(["prune", "--model", str(smollm2_gguf), "--ratio", "0.2", "--calib-file",
                 str(data_dir / "c4" / "c4_sample.jsonl"), "--num-samples", "8", "--seq-len", "128",
                 "--output", str(folder), "--no-progress"]) == 0
    out = export_gguf(folder, tmp_path / "smollm2-pruned.gguf")
    model, tokenizer = load_pruned(folder), load_tokenizer(folder)
    assert len({layer.mlp.gate_proj.out_features for layer in model.model.layers}) > 1
    text, _ = load_ppl_text("wikitext2", data_dir)
    windows = tokenize_windows(tokenizer, text, 128, 64)
    llm = _load(out, windows)
    logits = llamacpp.window_logits(llm, windows[:1].numpy())
    with torch.no_grad():
        ref = model(windows[:1]).logits.numpy()
    diff = float(np.abs(logits - ref).max())
    agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
    nll_cpp = llamacpp.window_nll(llm, windows.numpy())
    # independent of llamacpp.window_nll: torch's log-softmax of the window logits
    logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    nll0 = -logp[0, :-1].gather(-1, windows[0, 1:, None])[:, 0].numpy()
    np.testing.assert_allclose(nll_cpp[0], nll0, rtol=1e-9, atol=1e-9)
    ppl_cpp = math.exp(nll_cpp.mean())
    assert llamacpp.perplexity(out, windows, n_threads=2).ppl == pytest.approx(ppl_cpp, rel=1e-6)
    ppl_hf = math.exp(window_nll(model, windows).mean().item())
    print(f"SmolLM2 -20% f32 GGUF: max |logits diff| = {diff:.2e} (window 0), argmax agreement {agree:.4f}, "
          f"WikiText-2 PPL (64 x 128) llama.cpp {ppl_cpp:.3f} vs slimllm {ppl_hf:.3f}")
    # f32 in both, summed in different orders through 30 blocks: measured 2.4e-2 on logits of
    # magnitude ~20 (the 2-layer tiny model agrees to 1e-4)
    assert diff < 5e-2
    assert agree == 1.0
    assert abs(ppl_cpp / ppl_hf - 1) < 0.01
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer(TEXT, add_special_tokens=False).input_ids


def test_prune_cli_writes_gguf(make_tiny_model, tiny_tokenizer, tmp_path):
    """`prune --gguf F` writes, after the folder, the same tensors `export` writes from that
    folder; a family without GGUF export is refused before pruning (exit 2, nothing written)."""
    from test_pipeline import _cli, _save_tiny

    src = _save_tiny(make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2),
                     tiny_tokenizer, tmp_path / "dense")
    args = ("--model", src, "--ratio", 0.25, "--num-samples", 8, "--seq-len", 16, "--batch-size", 4,
            "--no-progress")
    run = _cli(*args, "--output", tmp_path / "pruned", "--gguf", tmp_path / "pruned.gguf",
               "--gguf-outtype", "f16")
    assert run.returncode == 0, run.stderr
    again = export_gguf(tmp_path / "pruned", tmp_path / "again.gguf", outtype="f16")
    _, got = _gguf_tensors(tmp_path / "pruned.gguf")
    _, want = _gguf_tensors(again)
    assert got.keys() == want.keys()
    for name, (data, qtype) in want.items():
        assert got[name][1] == qtype
        np.testing.assert_array_equal(got[name][0], data, err_msg=name)

    gemma = _save_tiny(make_tiny_model("gemma", num_heads=4, num_kv_heads=2, layers=2),
                       tiny_tokenizer, tmp_path / "gemma")
    bad = _cli("--model", gemma, *args[2:], "--output", tmp_path / "g-out", "--gguf", tmp_path / "g.gguf")
    assert bad.returncode == 2 and "GGUF export supports" in bad.stderr and "'gemma'" in bad.stderr
    assert not (tmp_path / "g-out").exists() and not (tmp_path / "g.gguf").exists()
    exists = _cli(*args, "--output", tmp_path / "x-out", "--gguf", tmp_path / "pruned.gguf")
    assert exists.returncode == 2 and "already exists" in exists.stderr
    assert not (tmp_path / "x-out").exists()
