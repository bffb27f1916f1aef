"""Architecture registry (slimllm.families.adapters): families, layer access, shapes, unsupported errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS
from slimllm.families.adapters import LayerShape, get_adapter, supported_architectures
from slimllm.errors import UnsupportedArchitectureError


def test_supported_architectures_listed():
    assert supported_architectures() == [
        "gemma", "gemma2", "gemma3_text", "granite", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3"
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
        # every logical projection is found, as rows of its own module or of a fused one,
        # and the modules are exactly the layer's Linear children
        linears = {
            f"{owner}.{name}"
            for owner, module in (("self_attn", adapter.attention(layer)), ("mlp", adapter.mlp(layer)))
            for name, child in module.named_children()
            if isinstance(child, torch.nn.Linear)
        }
        assert set(adapter.linear_modules()) == linears
        rows = {}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            linear, part = adapter.projection(layer, name)
            rows[name] = linear.weight[part].shape
        assert rows == {
            "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
            "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96),
        }
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
    with pytest.raises(UnsupportedArchitectureError, match="'phimoe'"):
        get_adapter("slimllm_phimoe")
    with pytest.raises(UnsupportedArchitectureError):
        get_adapter(object())


def test_phi3_fused_projections_split_like_its_forward(make_tiny_model):
    """The adapter's row split of qkv_proj / gate_up_proj is the one Phi3Attention and Phi3MLP
    apply: q, k, v computed from the adapter's rows equal the states the forward splits off, and
    the MLP rebuilt from the gate / up rows equals the module's output."""
    model = make_tiny_model("phi3", num_heads=6, num_kv_heads=2, head_dim=16, intermediate=40)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    assert [(f.module, f.parts) for f in adapter.fused_projections] == [
        ("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))
    ]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    qkv = attn.qkv_proj(x)
    q_end = attn.config.num_attention_heads * attn.head_dim
    kv_end = q_end + attn.num_key_value_heads * attn.head_dim
    forward_split = {"q_proj": qkv[:, :q_end], "k_proj": qkv[:, q_end:kv_end], "v_proj": qkv[:, kv_end:]}
    for name, states in forward_split.items():
        linear, rows = adapter.projection(layer, name)
        torch.testing.assert_close(x @ linear.weight[rows].T, states, rtol=0, atol=1e-6)
    (gate, gate_rows), (up, up_rows) = adapter.projection(layer, "gate_proj"), adapter.projection(layer, "up_proj")
    down, _ = adapter.projection(layer, "down_proj")
    rebuilt = down(mlp.activation_fn(x @ gate.weight[gate_rows].T) * (x @ up.weight[up_rows].T))
    torch.testing.assert_close(rebuilt, mlp(x), rtol=0, atol=1e-6)
    assert adapter.layer_shape(layer) == LayerShape(num_heads=6, num_kv_heads=2, head_dim=16, intermediate_size=40)
