"""Layer surgery (slimllm.pruning.slicing): slicing equals masking on every tiny family, GQA and MHA,
tied and untied embeddings; attributes kept in sync; generate() after per-layer shapes; errors."""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS
from width_norms import mask_width_norms
from slimllm.families.adapters import get_adapter
from slimllm.errors import InvalidCountError, NonFiniteError, ShapeMismatchError
from slimllm.pruning.slicing import head_rows, keep_channels, keep_heads, set_linear

ATOL = 1e-5

# (num_heads, num_kv_heads): GQA and MHA; head_dim 16, hidden 64
HEAD_LAYOUTS = [(4, 2), (4, 4), (8, 2)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(vocab, seed=1, batch=2, length=11):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def _random_uniform_heads(rng, num_heads, num_kv, keep_per_group):
    """Kept query heads: the same number from every KV group (GQA uniform mode)."""
    group = num_heads // num_kv
    kept = []
    for g in range(num_kv):
        kept += sorted(rng.choice(group, keep_per_group, replace=False) + g * group)
    return [int(a) for a in kept]


def _affine(rng, d):
    return (
        torch.tensor(rng.uniform(0.5, 1.5, d), dtype=torch.float32),
        torch.tensor(rng.normal(0, 0.1, d), dtype=torch.float32),
    )


def _apply_affine_reference(linear, keep_cols_mask, scale, bias):
    """Reference: zero the pruned columns, scale rows, set the bias (on the unsliced model)."""
    with torch.no_grad():
        weight = linear.weight * keep_cols_mask[None, :].to(linear.weight.dtype)
        set_linear(linear, weight=weight * scale[:, None], bias=bias)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=lambda x: f"H{x[0]}G{x[1]}")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_slicing_equals_masking(make_tiny_model, tiny_tokenizer, arch, layout, tied):
    num_heads, num_kv = layout
    model = make_tiny_model(arch, num_heads=num_heads, num_kv_heads=num_kv, tied=tied, layers=3)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    rng = np.random.default_rng(zlib.crc32(f"{arch}-{layout}-{tied}".encode()))
    group = num_heads // num_kv
    ids = _ids(len(tiny_tokenizer))
    dense = _logits(model, ids)

    for idx, (layer, ref_layer) in enumerate(zip(adapter.layers(model), adapter.layers(reference), strict=True)):
        # per-layer different shapes: layer i keeps a different number of heads / channels
        if group > 1:
            kept = _random_uniform_heads(rng, num_heads, num_kv, 1 + idx % (group - 1) if group > 2 else 1)
        else:  # MHA: dropping a head drops its K/V head with it
            kept = sorted(int(a) for a in rng.choice(num_heads, num_heads - 1 - idx % 2, replace=False))
        channels = sorted(int(c) for c in rng.choice(96, 96 - 16 * (idx + 1), replace=False))
        o_scale, o_bias = _affine(rng, 64)
        d_scale, d_bias = _affine(rng, 64)

        keep_heads(adapter, layer, kept)
        attn = adapter.attention(layer)
        set_linear(attn.o_proj, weight=attn.o_proj.weight.detach() * o_scale[:, None], bias=o_bias)
        keep_channels(adapter, layer, channels)
        mlp = adapter.mlp(layer)
        set_linear(mlp.down_proj, weight=mlp.down_proj.weight.detach() * d_scale[:, None], bias=d_bias)

        mask_width_norms(adapter, adapter.attention(ref_layer), kept,
                         sorted({a // group for a in kept}), 16)  # olmo2's q_norm / k_norm
        head_mask = torch.zeros(num_heads * 16)
        head_mask[head_rows(kept, 16)] = 1
        _apply_affine_reference(adapter.attention(ref_layer).o_proj, head_mask, o_scale, o_bias)
        channel_mask = torch.zeros(96)
        channel_mask[channels] = 1
        _apply_affine_reference(adapter.mlp(ref_layer).down_proj, channel_mask, d_scale, d_bias)

        shape = adapter.layer_shape(layer)
        assert shape.num_heads == len(kept)
        assert shape.num_kv_heads == (num_kv if group > 1 else len(kept))
        assert shape.intermediate_size == len(channels)
        assert attn.num_key_value_groups == shape.num_heads // shape.num_kv_heads
        rows = {name: adapter.projection(layer, name) for name in ("q_proj", "gate_proj", "up_proj")}
        rows = {name: linear.weight[part].shape[0] for name, (linear, part) in rows.items()}
        assert rows["q_proj"] == len(kept) * 16 and attn.o_proj.in_features == len(kept) * 16
        assert rows["gate_proj"] == rows["up_proj"] == mlp.down_proj.in_features == len(channels)

    sliced = _logits(model, ids)
    masked = _logits(reference, ids)
    assert not torch.allclose(sliced, dense, atol=1e-3)  # pruning did change the model
    torch.testing.assert_close(sliced, masked, atol=ATOL, rtol=0)
    assert len({tuple(vars(s).values()) for s in adapter.layer_shapes(model)}) > 1  # non-uniform
    assert model.config.head_dim == 16

    # generation with a KV cache through layers of different shapes; greedy matches the reference
    out = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref_out = reference.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    assert torch.equal(out, ref_out)


def _mask_kv_groups(adapter, layer, dropped_groups, group, head_dim, num_heads):
    """Reference for kv-group removal: zero the q rows of the groups' query heads and the k/v
    rows of the groups (weights and biases; rows of a fused qkv_proj found by the adapter). The
    heads then output exactly 0 (q = 0 gives uniform attention over v = 0), as if removed."""
    q_heads = [a for a in range(num_heads) if a // group in dropped_groups]
    with torch.no_grad():
        for name, rows in (
            ("q_proj", head_rows(q_heads, head_dim)),
            ("k_proj", head_rows(sorted(dropped_groups), head_dim)),
            ("v_proj", head_rows(sorted(dropped_groups), head_dim)),
        ):
            linear, part = adapter.projection(layer, name)
            linear.weight[rows + part.start] = 0
            if linear.bias is not None:
                linear.bias[rows + part.start] = 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", [(8, 4), (4, 2), (4, 4)], ids=lambda x: f"H{x[0]}G{x[1]}")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_kv_group_removal_equals_masking_qkv(make_tiny_model, tiny_tokenizer, arch, layout, tied):
    num_heads, num_kv = layout
    group = num_heads // num_kv
    model = make_tiny_model(arch, num_heads=num_heads, num_kv_heads=num_kv, tied=tied, layers=2)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    rng = np.random.default_rng(7)
    for idx, (layer, ref_layer) in enumerate(zip(adapter.layers(model), adapter.layers(reference), strict=True)):
        n_drop = 1 + idx % (num_kv - 1) if num_kv > 2 else 1
        dropped = {int(g) for g in rng.choice(num_kv, n_drop, replace=False)}
        kept_kv = [g for g in range(num_kv) if g not in dropped]
        kept = [a for a in range(num_heads) if a // group in kept_kv]
        keep_heads(adapter, layer, kept, kept_kv_heads=kept_kv)
        _mask_kv_groups(adapter, ref_layer, dropped, group, 16, num_heads)
        mask_width_norms(adapter, adapter.attention(ref_layer), kept, kept_kv, 16)
        attn = adapter.attention(layer)
        (k, k_rows), (v, v_rows) = adapter.projection(layer, "k_proj"), adapter.projection(layer, "v_proj")
        assert k.weight[k_rows].shape[0] == v.weight[v_rows].shape[0] == len(kept_kv) * 16
        assert attn.num_key_value_groups == group
        if k.bias is not None:
            assert k.bias[k_rows].shape == (len(kept_kv) * 16,)
    ids = _ids(len(tiny_tokenizer), seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=ATOL, rtol=0)
    out = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_kv_mode_with_partial_groups(make_tiny_model, tiny_tokenizer):
    """kv-group mode and fewer query heads per kept group at once."""
    model = make_tiny_model("qwen2", num_heads=8, num_kv_heads=4)
    reference = copy.deepcopy(model)
    adapter = get_adapter(model)
    layer, ref_layer = adapter.layers(model)[0], adapter.layers(reference)[0]
    keep_heads(adapter, layer, [0, 4, 6], kept_kv_heads=[0, 2, 3])
    assert adapter.layer_shape(layer).num_heads == 3 and adapter.layer_shape(layer).num_kv_heads == 3
    assert adapter.attention(layer).num_key_value_groups == 1
    _mask_kv_groups(adapter, ref_layer, {1}, 2, 16, 8)
    pruned_q = head_rows([1, 5, 7], 16)
    with torch.no_grad():
        adapter.attention(ref_layer).o_proj.weight[:, pruned_q] = 0
    ids = _ids(len(tiny_tokenizer), seed=5)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=ATOL, rtol=0)


def test_dtype_device_and_grad_flags_kept(make_tiny_model):
    model = make_tiny_model("qwen2").to(torch.bfloat16)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    keep_heads(adapter, layer, [1, 3])
    keep_channels(adapter, layer, [0, 5, 7])
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert isinstance(linear, torch.nn.Linear)
        assert linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
        assert linear.weight.shape == (linear.out_features, linear.in_features)
        assert linear.weight.requires_grad
    assert attn.q_proj.bias.dtype == torch.bfloat16 and attn.q_proj.bias.shape == (32,)
    assert mlp.intermediate_size == 3
    set_linear(attn.o_proj, bias=np.arange(64, dtype=np.float64))
    assert attn.o_proj.bias.dtype == torch.bfloat16
    assert torch.equal(attn.o_proj.bias.float(), torch.arange(64, dtype=torch.float32))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_head_dim_made_explicit_in_config(make_tiny_model):
    model = make_tiny_model("qwen2", num_heads=4, num_kv_heads=2, head_dim=16)
    del model.config.head_dim  # Qwen2Config derives it from hidden_size / heads when absent
    adapter = get_adapter(model)
    keep_heads(adapter, adapter.layers(model)[0], [0, 2])
    assert model.config.head_dim == 16
    assert model.config.num_attention_heads == 4  # the config stays the dense template


def test_set_linear_adds_and_replaces(make_tiny_model):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[0])
    assert attn.o_proj.bias is None
    set_linear(attn.o_proj, bias=torch.ones(64, dtype=torch.float64))
    assert isinstance(attn.o_proj.bias, torch.nn.Parameter)
    assert attn.o_proj.bias.dtype == torch.float32 and torch.equal(attn.o_proj.bias, torch.ones(64))
    new_weight = torch.randn(64, 64)
    set_linear(attn.o_proj, weight=new_weight)
    assert torch.equal(attn.o_proj.weight, new_weight)
    assert torch.equal(attn.o_proj.bias, torch.ones(64))  # untouched
    x = torch.randn(3, 64)
    torch.testing.assert_close(attn.o_proj(x), x @ new_weight.T + 1)


def test_set_linear_errors_leave_layer_unchanged(make_tiny_model):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    linear = adapter.attention(adapter.layers(model)[0]).o_proj
    before = linear.weight.detach().clone()
    with pytest.raises(ShapeMismatchError):
        set_linear(linear, weight=torch.randn(64, 32))
    with pytest.raises(ShapeMismatchError):
        set_linear(linear, weight=torch.randn(64, 64), bias=torch.randn(63))
    bad = torch.randn(64, 64)
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError):
        set_linear(linear, weight=bad)
    with pytest.raises(NonFiniteError):
        set_linear(linear, bias=torch.full((64,), float("inf")))
    assert torch.equal(linear.weight, before) and linear.bias is None


@pytest.mark.parametrize(
    ("kept", "kept_kv", "match"),
    [
        ([], None, "nothing kept"),
        ([0, 0, 1], None, "duplicate"),
        ([0, 8], None, "outside"),
        ([0, 1, 2, 4], None, "same"),  # groups keep 3 and 1 query heads
        ([0, 1, 4], [0], "drops"),  # head 4 reads KV head 1, dropped
        ([0, 1], [0, 1], "same"),  # KV head 1 kept with no query head
        ([0, 1], [2], "outside"),
        ([0.5], None, "integer"),
    ],
)
def test_keep_heads_rejects_bad_selections(make_tiny_model, kept, kept_kv, match):
    model = make_tiny_model("llama", num_heads=8, num_kv_heads=2)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(InvalidCountError, match=match):
        keep_heads(adapter, layer, kept, kept_kv)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert adapter.attention(layer).num_key_value_groups == 4


def test_keep_channels_rejects_bad_selections(make_tiny_model):
    model = make_tiny_model("mistral")
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    for bad in ([], [0, 96], [3, 3], [-1]):
        with pytest.raises(InvalidCountError):
            keep_channels(adapter, layer, bad)
    assert adapter.layer_shape(layer).intermediate_size == 96
    keep_channels(adapter, layer, np.array([5, 1, 2]))  # numpy, unsorted: sorted on the way in
    torch.testing.assert_close(
        adapter.mlp(layer).down_proj.weight,
        adapter.mlp(adapter.layers(make_tiny_model("mistral"))[0]).down_proj.weight[:, [1, 2, 5]],
    )


def test_keep_heads_accepts_tensors_and_keeps_order_of_heads(make_tiny_model):
    model = make_tiny_model("llama", num_heads=4, num_kv_heads=2)
    original = copy.deepcopy(model)
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    keep_heads(adapter, layer, torch.tensor([3, 0]))
    src = adapter.attention(adapter.layers(original)[0])
    rows = head_rows([0, 3], 16)
    assert torch.equal(adapter.attention(layer).q_proj.weight, src.q_proj.weight[rows])
    assert torch.equal(adapter.attention(layer).o_proj.weight, src.o_proj.weight[:, rows])
    assert torch.equal(adapter.attention(layer).k_proj.weight, src.k_proj.weight)
