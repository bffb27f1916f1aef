"""Gemma 2 and Gemma 3 (text) specifics, on tiny random models built from transformers' own
``Gemma2Config`` / ``Gemma3TextConfig`` (conftest's ``make_tiny_model``: no download).

What the two families add to the Llama layout, and where each is checked:

- ``head_dim`` independent of hidden / heads (32 here, hidden 64 and 4 heads): every test;
- "sandwich" norms (o_proj and down_proj outputs normalised before the residual add) and
  ``1 + weight`` RMSNorms (random weights): sliced == masked with a closed-form reference here,
  and the recovery fit on o_proj's own output in ``test_pipeline.py``
  (``test_affine_o_proj_fit_equals_polyfit``, ``test_sliced_model_equals_masked_model``);
- attention / final logit soft-capping (gemma2), ``query_pre_attn_scalar`` score scaling,
  sliding-window layers interleaved with global ones, q_norm / k_norm of size head_dim
  (gemma3_text): kept by slicing and by the saved config;
- no biases in the stock layout: the recovery biases of o_proj / down_proj go to the per-layer
  (remote-code) config, an o_proj bias alone fits the stock ``attention_bias`` flag;
- the multimodal ``gemma3`` (vision tower + text decoder) is refused with a typed error.

The masked-model comparison over every recovery mode for gemma, gemma2 and gemma3_text is
``test_pipeline.py::test_sliced_model_equals_masked_model``; the per-layer round trip with
random recovery biases is ``test_checkpoint.py::test_non_uniform_round_trip``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from slimllm.errors import ConfigError, UnsupportedArchitectureError
from slimllm.evaluation.inspection import inspect_folder
from slimllm.families.adapters import get_adapter
from slimllm.io import checkpoint
from slimllm.pruning.pipeline import PruneConfig, prune_model
from slimllm.pruning.ratios import count_parameters
from slimllm.pruning.slicing import head_rows, keep_heads, set_linear

ARCHS = ("gemma2", "gemma3_text")
HEAD_DIM = 32  # hidden 64 / 4 heads would be 16
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _tokens(vocab: int, n: int = 3, length: int = 20, seed: int = 0) -> torch.Tensor:
    """Random token ids (n, length), longer than the sliding window (6)."""
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gemma(make_tiny_model, arch, tied=False, num_kv_heads=2):
    model = make_tiny_model(arch, num_heads=4, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM, layers=3, tied=tied)
    assert model.config.layer_types == LAYER_TYPES
    return model


def _config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_slicing_keeps_head_dim_scaling_softcaps_and_windows(make_tiny_model, arch):
    """Removing heads changes neither head_dim, nor the score scaling query_pre_attn_scalar**-0.5,
    nor soft-capping, sliding windows or the shared q_norm/k_norm; the sliced model equals the
    dense one with the removed heads' o_proj columns zeroed (closed form), norms included."""
    dense = _gemma(make_tiny_model, arch)
    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    masked = copy.deepcopy(dense)
    kept = [[0, 3], [1, 2], [1, 3]]  # one query head per KV group (uniform GQA)
    for layer, masked_layer, heads, layer_type in zip(
        adapter.layers(model), adapter.layers(masked), kept, LAYER_TYPES, strict=True
    ):
        attn = adapter.attention(layer)
        assert adapter.layer_shape(layer).head_dim == HEAD_DIM
        assert attn.q_proj.out_features == 4 * HEAD_DIM != model.config.hidden_size
        norms = {n: getattr(attn, n).weight.clone() for n in adapter.shared_head_norms}
        keep_heads(adapter, layer, heads)
        shape = adapter.layer_shape(layer)
        assert (shape.num_heads, shape.num_kv_heads, shape.head_dim) == (2, 2, HEAD_DIM)
        assert attn.head_dim == HEAD_DIM and attn.num_key_value_groups == 1
        assert attn.scaling == 24**-0.5  # query_pre_attn_scalar, independent of head counts
        assert attn.sliding_window == (6 if layer_type == "sliding_attention" else None)
        if arch == "gemma2":
            assert attn.attn_logit_softcapping == 2.0
        for name, weight in norms.items():  # gemma3_text: q_norm / k_norm of size head_dim
            assert torch.equal(getattr(attn, name).weight, weight) and weight.shape == (HEAD_DIM,)
        dropped = head_rows([a for a in range(4) if a not in heads], HEAD_DIM)
        with torch.no_grad():
            adapter.attention(masked_layer).o_proj.weight[:, dropped] = 0.0
    assert (model.config.head_dim, model.config.query_pre_attn_scalar) == (HEAD_DIM, 24)
    ids = _tokens(model.config.vocab_size)
    torch.testing.assert_close(_logits(model, ids), _logits(masked, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(model, ids), _logits(dense, ids), atol=1e-3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_save_load_round_trip_per_layer(make_tiny_model, tiny_tokenizer, tmp_path, arch, tied):
    """prune_model (per-layer ratios, affine recovery biases on o_proj / down_proj, which the
    stock Gemma layout lacks) -> save_pruned -> per-layer remote-code config; load_pruned and
    from_pretrained(trust_remote_code=True) give exactly the same logits and greedy tokens, and
    every Gemma-specific config value survives."""
    model = _gemma(make_tiny_model, arch, tied=tied)
    calib = _tokens(model.config.vocab_size, n=6, length=24, seed=1)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, batch_size=3, progress=False))
    shapes = get_adapter(model).layer_shapes(model)
    assert len(set(shapes)) > 1 and all(s.head_dim == HEAD_DIM for s in shapes)
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    config = _config(out)
    assert config["model_type"] == f"slimllm_{arch}"
    assert config["head_dim"] == HEAD_DIM and config["query_pre_attn_scalar"] == 24
    assert config["sliding_window"] == 6 and config["layer_types"] == LAYER_TYPES
    assert config["tie_word_embeddings"] is tied
    if arch == "gemma2":
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (2.0, 10.0)
    for entry, shape, layer in zip(config["slimllm_layers"], shapes, report["layers"], strict=True):
        assert (entry["num_heads"], entry["num_kv_heads"], entry["head_dim"], entry["intermediate_size"]) == (
            shape.num_heads, shape.num_kv_heads, HEAD_DIM, shape.intermediate_size
        )
        recovered = {"o_proj"} if layer["heads_removed"] else set()
        recovered |= {"down_proj"} if layer["channels_removed"] else set()
        assert set(entry["bias"]) == recovered
    assert any(entry["bias"] for entry in config["slimllm_layers"])

    ids = _tokens(model.config.vocab_size, seed=5)
    expected = _logits(model, ids)
    prompt = ids[:1, :10]
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for back in (
        checkpoint.load_pruned(out),
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True),
    ):
        assert back.config.layer_types == LAYER_TYPES and back.config.head_dim == HEAD_DIM
        assert torch.equal(_logits(back, ids), expected)
        # 16 positions with a window of 6: the sliding layers' cache keeps the last 6 only
        assert torch.equal(back.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), tokens)
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_prune_without_recovery_saves_stock_config(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    """Equal per-layer ratios and no recovery: every layer has the same shape and no bias, so
    the stock config (pruned head / channel counts, head_dim explicit) reloads it exactly with
    plain from_pretrained."""
    model = _gemma(make_tiny_model, arch)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=2)
    config = PruneConfig(layer_ratios=[0.4] * 3, recovery="none", progress=False)
    model, report = prune_model(model, None, calib, config)
    shape = get_adapter(model).layer_shape(get_adapter(model).layers(model)[0])
    assert shape.num_heads < 4 and shape.intermediate_size < 96
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    saved = _config(out)
    assert saved["model_type"] == arch and "auto_map" not in saved
    assert (saved["num_attention_heads"], saved["num_key_value_heads"]) == (shape.num_heads, shape.num_kv_heads)
    assert (saved["head_dim"], saved["intermediate_size"]) == (HEAD_DIM, shape.intermediate_size)
    assert saved["attention_bias"] is False and saved["layer_types"] == LAYER_TYPES
    assert not (out / checkpoint.REMOTE_CODE_NAME).exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == type(model).__name__
    ids = _tokens(model.config.vocab_size, seed=6)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_o_proj_bias_uses_stock_attention_bias(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    """Gemma's attention_bias covers q/k/v/o: an o_proj recovery bias alone is saved with the
    stock config (zero q/k/v biases added) and reloads exactly."""
    model = _gemma(make_tiny_model, arch)
    adapter = get_adapter(model)
    for layer in adapter.layers(model):
        keep_heads(adapter, layer, [1, 2])
        set_linear(adapter.attention(layer).o_proj, bias=torch.linspace(-1, 1, 64))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", {})
    saved = _config(out)
    assert saved["model_type"] == arch and saved["attention_bias"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = _tokens(model.config.vocab_size, seed=7)
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    attn = adapter.attention(adapter.layers(back)[0])
    assert torch.equal(attn.o_proj.bias, torch.linspace(-1, 1, 64))
    assert torch.count_nonzero(attn.q_proj.bias) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_not_divisible_by_kv_heads_is_a_config_error(make_tiny_model, arch):
    """4 query heads over 3 KV heads: refused with a typed error before any weight changes."""
    model = _gemma(make_tiny_model, arch, num_kv_heads=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = _tokens(model.config.vocab_size, n=2, length=12)
    with pytest.raises(ConfigError, match="layer 0: 4 query heads do not divide into 3 KV heads"):
        prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_reads_pruned_gemma_folder(make_tiny_model, tiny_tokenizer, tmp_path, arch):
    """inspect: family, per-layer shapes with head_dim 32 and parameter counts equal to the
    model in memory (sandwich norms and gemma3's q_norm / k_norm counted)."""
    model = _gemma(make_tiny_model, arch)
    calib = _tokens(model.config.vocab_size, n=4, length=24, seed=4)
    model, report = prune_model(model, None, calib, PruneConfig(ratio=0.3, progress=False))
    out = checkpoint.save_pruned(model, tiny_tokenizer, tmp_path / "out", report)
    info = inspect_folder(out)
    assert info.family == arch and info.model_type == f"slimllm_{arch}" and info.config_format == "per-layer"
    adapter = get_adapter(model)
    assert [(x.num_heads, x.num_kv_heads, x.head_dim, x.intermediate_size) for x in info.layers] == [
        (s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) for s in adapter.layer_shapes(model)
    ]
    for x, layer in zip(info.layers, adapter.layers(model), strict=True):
        assert x.attention_params == sum(p.numel() for p in layer.self_attn.parameters())
        assert x.norm_params == sum(p.numel() for n, p in layer.named_parameters() if "layernorm" in n)
    assert info.total_params == count_parameters(model)


def test_multimodal_gemma3_is_refused_with_a_typed_error(tmp_path):
    """Gemma3ForConditionalGeneration (model_type gemma3: vision tower + text decoder) has its
    layers under model.language_model: refused by name before anything changes; as a folder,
    its model_type is listed as unsupported, next to gemma3_text."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match="Gemma3ForConditionalGeneration has no decoder layers"):
        prune_model(model, None, _tokens(290, n=2, length=12), PruneConfig(ratio=0.2, progress=False))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "mm")
    with pytest.raises(UnsupportedArchitectureError, match="'gemma3' is not supported.*gemma3_text"):
        checkpoint.load_model(tmp_path / "mm")
