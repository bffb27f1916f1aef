"""Per-layer ratio allocation, counts, exact parameter accounting and the target search
(slimllm.pruning.ratios, DESIGN.md section 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimllm.families.adapters import get_adapter
from slimllm.errors import ConfigError
from slimllm.pruning.ratios import (
    LayerSpec,
    allocate_ratios,
    count_parameters,
    layer_specs,
    linear_parameters,
    plan_for_target,
    plan_from_layer_ratios,
    plan_from_ratios,
    removal_counts,
)

SMOL = LayerSpec(num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, hidden_size=576)


def test_allocation_is_softmax_over_the_most_similar_layers():
    s = [0.5, 0.9, 0.7, 0.95, 0.6]
    r = allocate_ratios(s, 0.2, pruned_layers=3, alpha=10.0)
    chosen = [1, 2, 3]
    assert [i for i, v in enumerate(r) if v > 0] == chosen
    z = np.exp(10.0 * np.array([s[i] for i in chosen]))
    expected = 0.2 * 3 * z / z.sum()
    assert np.allclose([r[i] for i in chosen], expected)
    assert math.isclose(sum(r), 0.2 * 3)
    # all layers by default; alpha 0 is uniform
    assert allocate_ratios(s, 0.3, alpha=0.0) == pytest.approx([0.3] * 5)
    with pytest.raises(ConfigError, match="pruned_layers"):
        allocate_ratios(s, 0.2, pruned_layers=6)


def test_counts_uniform_gqa_are_multiples_of_kv_heads():
    # r * H / G = 0.4 * 3 = 1.2 -> 1 head per group -> 3 heads; channels round(0.4 * 1536)
    assert removal_counts(0.4, SMOL) == (3, 0, 614, [])
    assert removal_counts(0.5, SMOL)[:2] == (6, 0)  # round(1.5) = 2 per group (half to even)
    assert removal_counts(0.1, SMOL)[:3] == (0, 0, 154)


def test_counts_kv_group_and_mha():
    assert removal_counts(0.4, SMOL, head_mode="kv-group")[:2] == (3, 1)
    mha = LayerSpec(num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=96, hidden_size=64)
    # one query head per KV group: heads go with their KV heads, any count
    assert removal_counts(0.3, mha)[:2] == (1, 1)
    assert removal_counts(0.5, mha)[:2] == (2, 2)  # round(2.0)
    assert removal_counts(0.3, mha, head_mode="kv-group")[:2] == (1, 1)


def test_channel_multiple():
    heads, kv, ch, clamped = removal_counts(0.25, SMOL, channel_multiple=64)
    assert ch % 64 == 0 and ch == round(0.25 * 1536 / 64) * 64
    assert removal_counts(0.25, SMOL, channel_multiple=128)[2] == 384


def test_clamping_keeps_one_head_per_group_and_one_channel():
    heads, kv, ch, clamped = removal_counts(1.7, SMOL)
    assert (heads, kv, ch) == (6, 0, 1535) and clamped == ["heads", "channels"]
    heads, kv, ch, clamped = removal_counts(0.99, SMOL, head_mode="kv-group", channel_multiple=128)
    assert (heads, kv) == (6, 2) and ch == 1408 and clamped == ["heads", "channels"]
    with pytest.raises(ConfigError, match="layer 4: ratio 0.9 would remove 3 of 3 query heads per KV group"):
        removal_counts(0.9, SMOL, clamp=False, layer=4)
    with pytest.raises(ConfigError, match="would remove 9 of 9 KV groups"):
        removal_counts(0.9999, LayerSpec(9, 9, 64, 1536, 576), clamp=False)
    with pytest.raises(ConfigError, match="would remove 4 of 4 MLP channels"):
        removal_counts(0.9, LayerSpec(4096, 4096, 1, 4, 8), clamp=False)


@pytest.mark.parametrize(
    "arch, heads, kv, tied",
    [("llama", 4, 4, False), ("llama", 4, 2, True), ("qwen2", 4, 2, False), ("qwen3", 8, 2, True),
     ("mistral", 4, 2, False)],
)
def test_linear_parameter_formula_matches_the_modules(make_tiny_model, arch, heads, kv, tied):
    model = make_tiny_model(arch, num_heads=heads, num_kv_heads=kv, tied=tied)
    adapter = get_adapter(model)
    specs = layer_specs(model, adapter)
    for layer, spec in zip(adapter.layers(model), specs):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                   mlp.down_proj]
        assert linear_parameters(spec) == sum(p.numel() for m in modules for p in m.parameters())
    if arch == "qwen2":
        assert specs[0].q_bias and specs[0].k_bias and specs[0].v_bias and not specs[0].o_bias
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_removed_count_is_exact():
    spec = LayerSpec(4, 2, 16, 96, 64, q_bias=True, k_bias=True, v_bias=True)
    full = linear_parameters(spec)
    # 2 query heads (q rows + o columns), 1 KV head (k, v rows), 10 channels, two new biases
    after = linear_parameters(spec, 2, 1, 10, True, True)
    removed = 2 * 16 * (64 + 1) + 64 * 2 * 16 + 2 * 16 * (64 + 1) + 10 * 3 * 64 - 2 * 64
    assert full - after == removed


def _specs(n=6):
    return [SMOL] * n


def test_target_search_hits_the_target():
    specs = _specs(30)
    total = 134_515_008
    importance = np.linspace(0.80, 0.98, 30)
    for target in (0.05, 0.2, 0.3):
        plan = plan_for_target(target, importance, specs, total)
        assert abs(plan.achieved_ratio - target) < 0.005
        assert plan.params_before == total
        assert plan.params_before - plan.params_after == plan.params_removed
        recount = total + sum(
            linear_parameters(s, p.heads_removed, p.kv_heads_removed, p.channels_removed,
                              p.o_bias_added, p.down_bias_added) - linear_parameters(s)
            for s, p in zip(specs, plan.layers)
        )
        assert recount == plan.params_after
        # more important (less similar) layers are pruned less
        ch = [p.channels_removed for p in plan.layers]
        assert ch == sorted(ch)
    assert plan_for_target(0.0, importance, specs, total).params_removed == 0


def test_recovery_biases_are_counted():
    specs = _specs(4)
    imp = [0.9, 0.9, 0.9, 0.9]
    affine = plan_from_ratios([0.3] * 4, specs, 10**8, imp, recovery="affine")
    none = plan_from_ratios([0.3] * 4, specs, 10**8, imp, recovery="none")
    assert none.params_after - affine.params_after == -4 * 2 * 576
    assert all(p.o_bias_added and p.down_bias_added for p in affine.layers)
    zero = plan_from_ratios([0.0] * 4, specs, 10**8, imp)
    assert zero.params_after == 10**8 and not any(p.o_bias_added for p in zero.layers)


def test_pruned_layers_leave_the_rest_untouched():
    imp = [0.5, 0.99, 0.6, 0.98]
    plan = plan_for_target(0.1, imp, _specs(4), 4 * linear_parameters(SMOL) + 10**6, pruned_layers=2)
    assert [p.channels_removed > 0 for p in plan.layers] == [False, True, False, True]
    assert plan.layers[0].heads_removed == plan.layers[2].heads_removed == 0


def test_unreachable_and_invalid_targets():
    specs = _specs(2)
    total = 2 * linear_parameters(SMOL) + 30_000_000
    with pytest.raises(ConfigError, match="cannot remove 90.00% of the parameters: at most"):
        plan_for_target(0.9, [0.9, 0.8], specs, total)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
            plan_for_target(bad, [0.9, 0.8], specs, total)


def test_explicit_layer_ratios_are_not_clamped():
    specs = _specs(3)
    plan = plan_from_layer_ratios([0.0, 0.2, 0.4], specs, 10**8)
    assert [p.channels_removed for p in plan.layers] == [0, round(0.2 * 1536), round(0.4 * 1536)]
    with pytest.raises(ConfigError, match="layer 1: ratio 0.9 would remove 3 of 3"):
        plan_from_layer_ratios([0.1, 0.9, 0.1], specs, 10**8)
    with pytest.raises(ConfigError, match=r"layer 0: ratio must be in \[0, 1\)"):
        plan_from_layer_ratios([1.0, 0.1, 0.1], specs, 10**8)
    with pytest.raises(ConfigError, match="3 layer ratios given for a model of 2 layers"):
        plan_from_ratios([0.1] * 3, _specs(2), 10**8)


def test_plan_dict_is_json_ready():
    import json

    plan = plan_for_target(0.2, np.linspace(0.8, 0.95, 4), _specs(4), 20_000_000)
    d = plan.to_dict()
    json.dumps(d)
    assert d["achieved_ratio"] == plan.achieved_ratio and len(d["layers"]) == 4
