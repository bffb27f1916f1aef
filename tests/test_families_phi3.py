"""Phi-3 specifics (Phi-3 / Phi-3.5 / Phi-4-mini layout), on tiny random models built from
transformers' own ``Phi3Config`` (conftest's ``make_tiny_model``: no download), with Phi-4-mini's
``partial_rotary_factor`` 0.75 (rotary on 12 of 16 dimensions per head).

What the family adds to the Llama layout, and where each is checked:

- fused ``qkv_proj`` (rows q, k, v) and ``gate_up_proj`` (rows gate, up): slicing keeps the
  kept heads' / channels' rows of every part (closed form here); sliced == masked over every
  recovery mode in ``test_pipeline.py::test_sliced_model_equals_masked_model`` and with
  per-layer shapes / kv-group removal in ``test_slicing.py`` (phi3 is in ``TINY_ARCHS``);
- the attention forward splits qkv with ``config.num_attention_heads`` /
  ``num_key_value_heads``: a pruned layer reads a per-layer config view, which follows later
  changes of the model config (attention implementation) and survives ``deepcopy``;
- no biases in the stock layout: recovery biases go to the per-layer (remote-code) config
  (``test_checkpoint.py::test_non_uniform_round_trip`` too), a bias-free uniform prune to the
  stock config with explicit ``head_dim``;
- GGUF export (llama.cpp): with whole-head RoPE the fused projections are split into llama /
  deci tensors (``test_export_gguf.py``, logits in llama.cpp itself); Phi-4-mini's partial rotary
  embedding is refused with a typed error.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from slimllm.errors import ConfigError, InvalidCountError, UnsupportedArchitectureError
from slimllm.evaluation.inspection import inspect_folder
from slimllm.families.adapters import get_adapter
from slimllm.families.modeling_slimllm import LayerConfig
from slimllm.io import checkpoint
from slimllm.io.gguf_export import export_gguf
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.ratios import count_parameters
from slimllm.pruning.slicing import head_rows, keep_channels, keep_heads


def _tokens(vocab: int, n: int = 3, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _config(folder):
    return json.loads((folder / "config.json").read_text())


def _phi3(make_tiny_model, num_heads=8, num_kv_heads=2, layers=3, tied=False):
    model = make_tiny_model("phi3", num_heads=num_heads, num_kv_heads=num_kv_heads, layers=layers, tied=tied)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.75
    assert model.model.rotary_emb.inv_freq.shape == (6,)  # 12 of 16 dimensions rotate
    return model


def test_slicing_cuts_the_rows_of_every_fused_part(make_tiny_model):
    """qkv_proj keeps the query rows of the kept heads, then the key rows and the value rows of
    the kept KV heads; gate_up_proj the kept channels' rows of both halves; the attention reads
    its own head counts from a config view while the model config keeps the dense ones."""
    model = _phi3(make_tiny_model)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    qkv, gate_up, o = (m.weight.detach().clone() for m in (attn.qkv_proj, mlp.gate_up_proj, attn.o_proj))
    q, k, v = qkv[:128], qkv[128:160], qkv[160:]
    gate, up = gate_up[:96], gate_up[96:]
    kept, kept_kv = [4, 5, 7], [1]  # kv-group mode: the heads of KV head 0 go, 3 of 4 in group 1
    with pytest.raises(InvalidCountError, match="same"):  # uneven groups: refused, no change
        keep_heads(adapter, layer, [0, 4, 5])
    assert attn.qkv_proj.weight.shape == (192, 64)
    keep_heads(adapter, layer, kept, kept_kv_heads=kept_kv)
    channels = [0, 3, 17, 50, 95]
    keep_channels(adapter, layer, channels)

    kv_rows = head_rows(kept_kv, 16)
    expected_qkv = torch.cat([q[head_rows(kept, 16)], k[kv_rows], v[kv_rows]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(attn.o_proj.weight, o[:, head_rows(kept, 16)])
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[channels], up[channels]]))
    assert adapter.layer_shape(layer).num_heads == 3 and adapter.layer_shape(layer).num_kv_heads == 1
    assert adapter.layer_shape(layer).intermediate_size == 5

    assert isinstance(attn.config, LayerConfig) and attn.config.base is model.config
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads) == (3, 1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 2)
    assert attn.num_key_value_heads == 1 and attn.num_key_value_groups == 3
    other = adapter.attention(adapter.layers(model)[1])
    assert other.config is model.config  # unpruned layers read the model config itself
    # the view is live: a later attention implementation reaches the pruned layer
    ids = _tokens(model.config.vocab_size)
    before = _logits(model, ids)
    model.set_attn_implementation("eager")
    assert attn.config._attn_implementation == "eager"
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-5)
    # pruning the layer again keeps one view over the model config
    keep_heads(adapter, layer, [0, 2])
    assert attn.config.base is model.config and attn.config.num_attention_heads == 2
    # deepcopy: the copy's view reads the copy's config
    clone = copy.deepcopy(model)
    clone_attn = adapter.attention(adapter.layers(clone)[0])
    assert clone_attn.config.base is clone.config and clone_attn.config.num_attention_heads == 2
    torch.testing.assert_close(_logits(clone, ids), _logits(model, ids), rtol=0, atol=0)


def test_sliced_model_equals_masked_model_closed_form(make_tiny_model):
    """Per-layer shapes, tied embeddings: the sliced model equals the dense one with the removed
    heads' q rows and o_proj columns and the removed channels' gate/up rows zeroed (a zero gate
    row gives silu(0) * up = 0; a zero q row with zero o columns removes the head), and its
    greedy generation with a KV cache matches."""
    dense = _phi3(make_tiny_model, num_heads=4, num_kv_heads=2, tied=True)
    model, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    adapter = get_adapter(model)
    for idx, (layer, ref) in enumerate(zip(adapter.layers(model), adapter.layers(masked), strict=True)):
        kept = [[0, 3], [1, 2, 3, 0], [1, 3]][idx]
        channels = list(range(idx, 96, 2 + idx))
        keep_heads(adapter, layer, kept)
        keep_channels(adapter, layer, channels)
        pruned = head_rows([a for a in range(4) if a not in kept], 16)
        dropped = [c for c in range(96) if c not in channels]
        with torch.no_grad():
            ref.self_attn.o_proj.weight[:, pruned] = 0
            ref.self_attn.qkv_proj.weight[pruned] = 0
            ref.mlp.gate_up_proj.weight[dropped] = 0
    ids = _tokens(dense.config.vocab_size, seed=2)
    got = _logits(model, ids)
    torch.testing.assert_close(got, _logits(masked, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(got, _logits(dense, ids), atol=1e-3)
    out = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, masked.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))


def test_pruned_per_layer_folder_round_trip(make_tiny_model, tiny_tokenizer, tmp_path):
    """A prune with recovery biases saves per-layer (model_type slimllm_phi3, biases on o_proj /
    down_proj); load_pruned and from_pretrained(trust_remote_code=True) give the same logits
    exactly, every layer's attention with its own head counts; inspect reads the fused
    modules' shapes."""
    model = _phi3(make_tiny_model)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=3)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False))
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes(model)
    assert len(set(shapes)) > 1
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    config = _config(out)
    assert config["model_type"] == "slimllm_phi3"
    assert all(entry["bias"] == ["o_proj", "down_proj"] for entry in config["slimllm_layers"])
    assert config["num_attention_heads"] == 8 and config["head_dim"] == 16
    ids = _tokens(model.config.vocab_size, seed=5)
    expected = _logits(model, ids)
    for loaded in (
        checkpoint.load_pruned(out),
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(),
    ):
        assert torch.equal(_logits(loaded, ids), expected)
        assert loaded.model.rotary_emb.inv_freq.shape == (6,)
        for layer, shape in zip(get_adapter(loaded).layers(loaded), shapes, strict=True):
            attn = layer.self_attn
            assert attn.qkv_proj.weight.shape == ((shape.num_heads + 2 * shape.num_kv_heads) * 16, 64)
            assert layer.mlp.gate_up_proj.weight.shape == (2 * shape.intermediate_size, 64)
            assert (attn.config.num_attention_heads, attn.config.num_key_value_heads) == (
                shape.num_heads, shape.num_kv_heads
            )
        out_ids = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert torch.equal(out_ids, model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))
    info = inspect_folder(out)
    assert info.family == "phi3" and info.config_format == "per-layer"
    assert [(x.num_heads, x.num_kv_heads, x.intermediate_size) for x in info.layers] == [
        (s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes
    ]
    assert all(x.biases == ("o_proj", "down_proj") for x in info.layers)
    assert info.total_params == count_parameters(model)


def test_uniform_bias_free_prune_saves_the_stock_config(make_tiny_model, tiny_tokenizer, tmp_path):
    """Every layer keeps 1 query head per KV head and half the channels, no recovery: the stock
    Phi3Config (pruned head counts, explicit head_dim) holds it; plain from_pretrained loads the
    same logits exactly."""
    model = _phi3(make_tiny_model)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        keep_heads(adapter, layer, [1, 6])
        keep_channels(adapter, layer, list(range(0, 96, 2)))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    config = _config(out)
    assert config["model_type"] == "phi3"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 2, 16)
    assert config["intermediate_size"] == 48
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is transformers.Phi3ForCausalLM
    ids = _tokens(model.config.vocab_size, seed=6)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_heads_not_divisible_by_kv_heads_is_a_config_error(make_tiny_model):
    """4 query heads over 3 KV heads (qkv_proj rows 4h + 2 * 3h): refused with a typed error
    before any weight changes."""
    model = _phi3(make_tiny_model, num_heads=4, num_kv_heads=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _tokens(model.config.vocab_size, n=2, length=12)
    with pytest.raises(ConfigError, match="layer 0: 4 query heads do not divide into 3 KV heads"):
        prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_gguf_export_refuses_partial_rotary(make_tiny_model, tiny_tokenizer, tmp_path):
    """llama.cpp export of a Phi-4-mini-like model (rotary on 12 of 16 dimensions) is refused
    with the factor named, and nothing is written."""
    model = _phi3(make_tiny_model, layers=2)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=3)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    with pytest.raises(UnsupportedArchitectureError, match=r"partial rotary embedding \(partial_rotary_factor 0.75\)"):
        export_gguf(out, tmp_path / "phi3.gguf")
    assert not (tmp_path / "phi3.gguf").exists()


def test_longrope_uniform_prune_saves_per_layer_and_reloads_exactly(tiny_tokenizer, tmp_path):
    """LongRoPE (Phi-3 128k, Phi-4-mini) with partial rotary factor 0.75: Phi3Config checks the
    factor lists against hidden_size // num_attention_heads, which pruned head counts break, so
    even a uniform bias-free prune is saved per-layer (dense head counts, explicit head_dim);
    it reloads with the same logits on a sequence past original_max_position_embeddings,
    where the long factors apply."""
    rotary_half = int(16 * 0.75) // 2
    config = transformers.Phi3Config(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=32, pad_token_id=None, partial_rotary_factor=0.75,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
            "long_factor": [2.0 + 0.5 * i for i in range(rotary_half)],
        },
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.config.rope_parameters["rope_type"] == "longrope"
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        keep_heads(adapter, layer, [0, 3])
        keep_channels(adapter, layer, list(range(48)))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    saved = _config(out)
    assert saved["model_type"] == "slimllm_phi3"
    assert (saved["num_attention_heads"], saved["head_dim"]) == (4, 16)
    assert saved["rope_parameters"]["long_factor"] == config.rope_parameters["long_factor"]
    ids = _tokens(config.vocab_size, n=2, length=48, seed=9)  # 48 > 32: long factors
    loaded = checkpoint.load_pruned(out)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
