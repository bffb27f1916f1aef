"""vLLM export (``slimllm.io.vllm_export``), without vLLM: per-layer pruned tiny models written
as Nemotron-NAS with every layer's query heads padded back to the dense count.

What proves it here: the exported tensors, loaded into slimllm's own per-layer Llama model with
the padded shapes (an independent forward of the padded layout), give the pruned model's logits;
the padded q_proj rows / o_proj columns are exactly zero and the kept ones equal the source;
the config is what vLLM's ``nemotron_nas.py`` reads (``block_configs[i].attention.n_heads_in_group``,
``ffn.intermediate_size``) through ``AutoConfig`` with remote code. Loading in vLLM itself is
``benches/vllm_check.py`` (vLLM does not install beside this project's torch).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_export_gguf import PHI3, _pruned_folder

from slimllm.errors import CheckpointError, ConfigError, ShapeMismatchError, UnsupportedArchitectureError
from slimllm.io import checkpoint
from slimllm.io.checkpoint import load_pruned
from slimllm.io.vllm_export import export_vllm
from slimllm.pruning.pipeline import PruneConfig, prune_model


def _exported_state(folder) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state |= load_file(path)
    return state


def _padded_llama(config: dict, state: dict[str, torch.Tensor]):
    """slimllm's per-layer Llama model with the exported layout: every layer ``num_attention_heads``
    query heads, ``num_attention_heads / n_heads_in_group`` KV heads, its own FFN width and the
    biases present in ``state``."""
    config_cls, model_cls = checkpoint._remote().FAMILIES["llama"]
    data = {k: v for k, v in config.items()
            if k not in ("block_configs", "auto_map", "architectures", "model_type", "qkv_bias", "transformers_version")}
    full, head_dim = config["num_attention_heads"], config["head_dim"]
    layers = []
    for i, block in enumerate(config["block_configs"]):
        bias = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                if any(k.startswith(f"model.layers.{i}.") and k.endswith(f".{name}.bias") for k in state)]
        layers.append({"num_heads": full, "num_kv_heads": full // block["attention"]["n_heads_in_group"],
                       "head_dim": head_dim, "intermediate_size": block["ffn"]["intermediate_size"], "bias": bias})
    data["slimllm_layers"] = layers
    model = model_cls(config_cls(**data)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "granite"])
def test_per_layer_export_pads_query_heads_exactly(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    import transformers

    # granite tied: the folded lm_head (divided by logits_scaling) is its own tensor
    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path, arch, extras=PHI3 if arch == "phi3" else None,
                            tied=arch == "granite")
    pruned = load_pruned(folder)
    out = export_vllm(folder, tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert config["num_attention_heads"] == 4 and config["head_dim"] == 16
    state = _exported_state(out)
    shapes = []
    for i in range(3):
        q = state[f"model.layers.{i}.self_attn.q_proj.weight"]
        kv = state[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] // 16
        ffn = state[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0]
        assert q.shape == (4 * 16, 64)
        block = config["block_configs"][i]
        assert block["attention"]["n_heads_in_group"] * kv == 4 and block["ffn"]["intermediate_size"] == ffn
        shapes.append((kv, ffn))
    assert len(set(shapes)) > 1  # really per-layer
    # kept heads first in each KV group, padded heads zero; the same for o_proj columns (granite:
    # its attention and residual multipliers folded in)
    granite = arch == "granite"
    q_scale = pruned.config.attention_multiplier * 16 ** 0.5 if granite else 1.0
    o_scale = pruned.config.residual_multiplier if granite else 1.0
    for i, layer in enumerate(pruned.model.layers):
        attn = layer.self_attn
        if arch == "phi3":
            heads, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
            src_q = attn.qkv_proj.weight[: heads * 16]
        else:
            heads, kv = attn.q_proj.out_features // 16, attn.k_proj.out_features // 16
            src_q = attn.q_proj.weight
        got_q = state[f"model.layers.{i}.self_attn.q_proj.weight"].reshape(kv, 4 // kv, 16, 64)
        got_o = state[f"model.layers.{i}.self_attn.o_proj.weight"].reshape(64, kv, 4 // kv, 16)
        per = heads // kv
        assert torch.equal(got_q[:, :per].reshape(-1, 64), src_q.detach() * q_scale)
        assert torch.equal(got_o[:, :, :per].reshape(64, -1), attn.o_proj.weight.detach() * o_scale)
        assert not got_q[:, per:].any() and not got_o[:, :, per:].any()
    # the padded layout computes the pruned model's function
    ids = torch.randint(0, pruned.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pruned(ids).logits
        got = _padded_llama(config, state)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # parameters: the pruned model's plus the recorded padding
    report = json.loads((out / "slimllm_report.json").read_text())["vllm_export"]
    assert report["parameters"] == sum(v.numel() for v in state.values())
    untied = pruned.lm_head.weight.numel() if arch == "granite" else 0
    assert report["parameters"] - report["padding_parameters"] == sum(p.numel() for p in pruned.parameters()) + untied
    assert config["tie_word_embeddings"] == (arch != "granite" and pruned.config.tie_word_embeddings)
    # what vLLM's nemotron_nas.py reads, through AutoConfig with the folder's config code
    loaded = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert [b.attention.n_heads_in_group for b in loaded.block_configs] == [4 // kv for kv, _ in shapes]
    assert [b.ffn.intermediate_size for b in loaded.block_configs] == [f for _, f in shapes]
    assert not any(b.attention.no_op or b.ffn.no_op or hasattr(b.ffn, "ffn_mult") for b in loaded.block_configs)
    # recovery put o_proj / down_proj biases in some layers: zero ones fill the others, and gate / up
    assert loaded.qkv_bias == (arch == "qwen2") and loaded.attention_bias and loaded.mlp_bias
    for i in range(3):
        assert {f"model.layers.{i}.self_attn.o_proj.bias", f"model.layers.{i}.mlp.gate_proj.bias",
                f"model.layers.{i}.mlp.up_proj.bias", f"model.layers.{i}.mlp.down_proj.bias"} <= state.keys()
        assert not state[f"model.layers.{i}.mlp.gate_proj.bias"].any()
    assert sorted(os.listdir(tmp_path)) == ["tiny-pruned", "vllm"]


def test_stock_folder_is_copied_as_is(make_tiny_model, tiny_tokenizer, tmp_path):
    """A uniform prune saves a stock LlamaForCausalLM folder, which vLLM loads with no remote
    code: the export copies its weights byte for byte."""
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2, layers=2)
    ids = torch.randint(0, model.config.vocab_size, (8, 24), generator=torch.Generator().manual_seed(0))
    model, report = prune_model(model, tiny_tokenizer, ids, PruneConfig(layer_ratios=[0.3, 0.3], progress=False))
    folder = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "uniform", report)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    out = export_vllm(folder, tmp_path / "vllm")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert json.loads((out / "slimllm_report.json").read_text())["vllm_export"]["padding_parameters"] == 0


def test_bad_input_raises_typed_errors_and_leaves_nothing(make_tiny_model, tiny_tokenizer, tmp_path, capsys):
    from slimllm.cli import main

    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not empty; refusing to overwrite"):
        export_vllm(folder, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    qwen3 = make_tiny_model("qwen3", layers=2)
    ids = torch.randint(0, qwen3.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    qwen3, report = prune_model(qwen3, None, ids, PruneConfig(layer_ratios=[0.2, 0.5], progress=False))
    q3 = checkpoint.save_pruned(qwen3, tiny_tokenizer, tmp_path / "qwen3", report)
    with pytest.raises(UnsupportedArchitectureError, match="vLLM export supports llama, mistral, qwen2, phi3, granite, not 'qwen3'"):
        export_vllm(q3, tmp_path / "q3-vllm")
    phi4 = make_tiny_model("phi3", layers=2)  # partial_rotary_factor 0.75
    phi4, report = prune_model(phi4, None, ids, PruneConfig(layer_ratios=[0.2, 0.5], progress=False))
    p4 = checkpoint.save_pruned(phi4, tiny_tokenizer, tmp_path / "phi4", report)
    with pytest.raises(UnsupportedArchitectureError, match="partial rotary embedding"):
        export_vllm(p4, tmp_path / "p4-vllm")
    # MHA with 3 heads: a layer left with 2 KV heads cannot pad to 3 query heads per layer
    mha = make_tiny_model("llama", num_heads=3, num_kv_heads=3, layers=2, head_dim=16, hidden=48)
    ids = torch.randint(0, mha.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    mha, report = prune_model(mha, None, ids, PruneConfig(layer_ratios=[0.0, 0.3], progress=False))
    assert mha.model.layers[1].self_attn.k_proj.out_features == 2 * 16
    odd = checkpoint.save_pruned(mha, tiny_tokenizer, tmp_path / "mha", report)
    with pytest.raises(ShapeMismatchError, match="layer 1: 2 query heads and 2 KV heads do not pad to the 3"):
        export_vllm(odd, tmp_path / "mha-vllm")
    assert main(["export", str(folder), "--format", "vllm", "--outtype", "f16", "--output", str(tmp_path / "x")]) == 2
    assert f"{ConfigError.__name__}: --outtype and --vocab-gguf apply to --format gguf only" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["full", "mha", "phi4", "qwen3", "tiny-pruned"]


def test_cli_export_vllm(make_tiny_model, tiny_tokenizer, tmp_path, capsys):
    from slimllm.cli import main

    folder = _pruned_folder(make_tiny_model, tiny_tokenizer, tmp_path)
    assert main(["export", str(folder), "--format", "vllm", "--output", str(tmp_path / "v")]) == 0
    assert "slimllm export: wrote" in capsys.readouterr().err
    assert {"config.json", "configuration_decilm.py", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "v"))
