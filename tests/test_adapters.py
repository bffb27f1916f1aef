"""Architecture registry (slimllm.families.adapters): families, layer access, shapes, unsupported errors."""

from __future__ import annotations

import pytest
from conftest import TINY_ARCHS
from slimllm.families.adapters import LayerShape, get_adapter, supported_architectures
from slimllm.errors import UnsupportedArchitectureError


def test_supported_architectures_listed():
    assert supported_architectures() == [
        "gemma", "gemma2", "gemma3_text", "granite", "llama", "mistral", "olmo2", "qwen2", "qwen3"
    ]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_finds_layers_and_projections(make_tiny_model, arch):
    model = make_tiny_model(arch, num_heads=4, num_kv_heads=2, layers=3)
    adapter = get_adapter(model)
    assert adapter.name == arch
    assert get_adapter(model.config) is adapter
    assert get_adapter(model.config.to_dict()) is adapter
    assert get_adapter(arch) is adapter
    assert get_adapter(f"slimllm_{arch}") is adapter  # per-layer checkpoints
    layers = adapter.layers(model)
    assert len(layers) == 3
    assert adapter.layers(model.model) is layers  # the decoder stack works too
    for layer in layers:
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert hasattr(attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert hasattr(mlp, name)
        shape = adapter.layer_shape(layer)
        assert shape == LayerShape(num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
        assert shape.attention_width == 64 and shape.kv_width == 32
    assert adapter.layer_shapes(model) == [adapter.layer_shape(layer) for layer in layers]


def test_qwen3_head_norms_are_per_head_dim(make_tiny_model):
    model = make_tiny_model("qwen3", num_heads=4, num_kv_heads=2, head_dim=32)
    adapter = get_adapter(model)
    assert adapter.shared_head_norms == ("q_norm", "k_norm")
    attn = adapter.attention(adapter.layers(model)[0])
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (32,)
    assert adapter.layer_shape(adapter.layers(model)[0]).head_dim == 32


def test_qwen2_has_qkv_biases(make_tiny_model):
    model = make_tiny_model("qwen2")
    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[0])
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


def test_unsupported_architecture_names_it_and_lists_supported():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(config)
    message = str(info.value)
    assert "'gpt2'" in message
    for arch in TINY_ARCHS:
        assert arch in message
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        get_adapter({"model_type": "falcon"})
    with pytest.raises(UnsupportedArchitectureError, match="slimllm_phi3|'phi3'"):
        get_adapter("slimllm_phi3")
    with pytest.raises(UnsupportedArchitectureError):
        get_adapter(object())
