"""Per-layer pruning ratios from layer importance, exact parameter counts, target search
(DESIGN.md section 5).

- Layer importance s_i = mean over calibration tokens of cos(h_in, h_out) of block i in the dense
  model (high = the block changes its input little = prune more).
- The k blocks with the highest s_i (k = ``pruned_layers``, default all) get
  r_i = R * k * softmax(alpha * s)_i over those k; the others get 0.
- Counts removed in block i (Python ``round``, half to even):
  query heads ``round(r_i * H / G) * G`` in ``uniform`` mode (the same count from every KV
  group; with one query head per KV group, MHA, simply ``round(r_i * H)`` heads together with
  their KV heads), whole KV groups ``round(r_i * G)`` in ``kv-group`` mode; MLP channels
  ``round(r_i * F / m) * m`` for the channel multiple m (1 by default).
- Clamping: a block always keeps at least one query head per KV group, one KV group and one
  channel (m channels' worth of rounding: at most the largest multiple of m below F is
  removed). A count at that limit is marked ``clamped`` in the plan and the report.
- ``ratio`` R_target is the fraction of ALL parameters of the model to remove (embeddings,
  untied lm_head and norms count in the total). :func:`plan_for_target` finds the base ratio R
  by bisection on the exact parameter count of the resulting shapes, including the o_proj /
  down_proj biases the recovery adds, and reports the achieved fraction exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from slimllm.errors import ConfigError

__all__ = [
    "LayerSpec",
    "LayerPlan",
    "RatioPlan",
    "HEAD_MODES",
    "count_parameters",
    "layer_specs",
    "allocate_ratios",
    "removal_counts",
    "linear_parameters",
    "plan_from_ratios",
    "plan_for_target",
    "plan_from_layer_ratios",
]

HEAD_MODES = ("uniform", "kv-group")


@dataclass(frozen=True)
class LayerSpec:
    """What the parameter count of one decoder block's projections depends on.

    ``num_heads`` H, ``num_kv_heads`` G, ``head_dim`` h, ``intermediate_size`` F,
    ``hidden_size`` d, which projections carry a bias, and ``width_norms``: the projections
    (``"q_proj"``, ``"k_proj"``) whose whole output a norm with one weight per row normalises
    (OLMo 2's q_norm / k_norm, sliced with the heads).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    gate_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False
    width_norms: tuple[str, ...] = ()


@dataclass
class LayerPlan:
    """Pruning plan of one block.

    ``ratio`` is the allocated r_i before rounding (0 for blocks outside the pruned set);
    ``heads_removed`` query heads, ``kv_heads_removed`` KV heads (0 in uniform GQA mode),
    ``channels_removed`` MLP channels; ``clamped`` lists what hit its keep-at-least-one limit
    (``"heads"``, ``"channels"``); ``o_bias_added`` / ``down_bias_added`` say whether the
    recovery adds a bias that was not there.
    """

    index: int
    importance: float | None
    ratio: float
    heads_removed: int = 0
    kv_heads_removed: int = 0
    channels_removed: int = 0
    clamped: list = field(default_factory=list)
    o_bias_added: bool = False
    down_bias_added: bool = False


@dataclass
class RatioPlan:
    """Per-layer plan plus the exact parameter accounting (counts are ints, fractions exact
    quotients of them)."""

    layers: list
    base_ratio: float
    target_ratio: float | None
    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        """Parameters removed (an int: before - after)."""
        return self.params_before - self.params_after

    @property
    def achieved_ratio(self) -> float:
        """Removed fraction of all parameters, params_removed / params_before."""
        return self.params_removed / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict: ratios, exact counts, and one entry per layer."""
        return {
            "base_ratio": self.base_ratio,
            "target_ratio": self.target_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": self.params_removed,
            "achieved_ratio": self.achieved_ratio,
            "layers": [asdict(p) for p in self.layers],
        }


def count_parameters(model) -> int:
    """Number of distinct parameters of a torch model (tied weights counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


def layer_specs(model, adapter) -> list[LayerSpec]:
    """``LayerSpec`` of every decoder block of ``model``, read from its Linear modules."""
    specs = []
    for layer in adapter.layers(model):
        shape = adapter.layer_shape(layer)
        biased = {
            name: adapter.projection(layer, name)[0].bias is not None
            for name in (*adapter.attention_projections, *adapter.mlp_projections)
        }
        specs.append(
            LayerSpec(
                num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads,
                head_dim=shape.head_dim,
                intermediate_size=shape.intermediate_size,
                hidden_size=adapter.projection(layer, "o_proj")[0].out_features,
                **{f"{name.removesuffix('_proj')}_bias": has for name, has in biased.items()},
                width_norms=tuple(projection for _, projection in adapter.width_norms),
            )
        )
    return specs


def linear_parameters(
    spec: LayerSpec,
    heads_removed: int = 0,
    kv_heads_removed: int = 0,
    channels_removed: int = 0,
    o_bias_added: bool = False,
    down_bias_added: bool = False,
) -> int:
    """Parameters of the seven projections (q, k, v, o, gate, up, down) of a block after the
    given removals, plus the norms over a projection's whole output (``spec.width_norms``, one
    weight per row: OLMo 2's q_norm / k_norm). Other norms (and Qwen3's per-head q_norm/k_norm
    of size h) are not affected by pruning and not counted here."""
    d, h = spec.hidden_size, spec.head_dim
    q = (spec.num_heads - heads_removed) * h
    kv = (spec.num_kv_heads - kv_heads_removed) * h
    f = spec.intermediate_size - channels_removed
    norms = spec.width_norms
    n = q * d + q * spec.q_bias + q * ("q_proj" in norms)
    n += 2 * kv * d + kv * spec.k_bias + kv * spec.v_bias
    n += kv * ("k_proj" in norms) + kv * ("v_proj" in norms)
    n += d * q + d * (spec.o_bias or o_bias_added)
    n += 2 * f * d + f * spec.gate_bias + f * spec.up_bias
    n += d * f + d * (spec.down_bias or down_bias_added)
    return n


def allocate_ratios(
    importance: Sequence[float],
    base_ratio: float,
    pruned_layers: int | None = None,
    alpha: float = 10.0,
) -> list[float]:
    """r_i = R * k * softmax(alpha * s)_i over the k blocks of highest importance s (ties: the
    lower index first); 0 for the others. Values may exceed 1 (see :func:`removal_counts`)."""
    s = np.asarray(importance, dtype=np.float64)
    n = len(s)
    k = n if pruned_layers is None else int(pruned_layers)
    if not 1 <= k <= n:
        raise ConfigError(f"pruned_layers must be in [1, {n}], got {pruned_layers}")
    chosen = sorted(range(n), key=lambda i: (-s[i], i))[:k]
    z = alpha * s[chosen]
    z = np.exp(z - z.max())
    soft = z / z.sum()
    ratios = [0.0] * n
    for i, p in zip(chosen, soft):
        ratios[i] = float(base_ratio * k * p)
    return ratios


def _head_limits(spec: LayerSpec, head_mode: str) -> tuple[int, int]:
    """(group size g, maximum count of removable units) for the head mode."""
    H, G = spec.num_heads, spec.num_kv_heads
    g = H // G
    if head_mode == "kv-group" or g == 1:
        return g, G - 1
    return g, g - 1


def removal_counts(
    ratio: float,
    spec: LayerSpec,
    head_mode: str = "uniform",
    channel_multiple: int = 1,
    clamp: bool = True,
    layer: int | None = None,
) -> tuple[int, int, int, list]:
    """(heads_removed, kv_heads_removed, channels_removed, clamped) for a block at ratio r.

    Uniform GQA mode: ``round(r * H / G)`` query heads from every group (so a multiple of G in
    all); one query head per group (MHA): ``round(r * H)`` heads with their KV heads; kv-group
    mode: ``round(r * G)`` whole groups. Channels: ``round(r * F / m) * m``.

    With ``clamp`` a count that would leave a group without a query head, the block without a
    KV group or without a channel is reduced to the limit and named in ``clamped``; without it
    (explicit per-layer ratios) that raises ConfigError naming the layer.
    """
    where = f"layer {layer}: " if layer is not None else ""
    if not (ratio >= 0 and math.isfinite(ratio)):
        raise ConfigError(f"{where}ratio must be a finite number >= 0, got {ratio}")
    H, G, F = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    if G < 1 or H % G:
        raise ConfigError(f"{where}{H} query heads are not divisible into {G} KV heads")
    g, unit_max = _head_limits(spec, head_mode)
    clamped = []
    if head_mode == "kv-group" or g == 1:
        units = round(ratio * G)
    else:
        units = round(ratio * g)
    if units > unit_max:
        if not clamp:
            what = "KV groups" if (head_mode == "kv-group" or g == 1) else "query heads per KV group"
            raise ConfigError(
                f"{where}ratio {ratio:g} would remove {units} of {G if what == 'KV groups' else g} "
                f"{what} and leave the layer with 0 heads"
            )
        units = unit_max
        clamped.append("heads")
    if head_mode == "kv-group" or g == 1:
        heads, kv = units * g, units
    else:
        heads, kv = units * G, 0
    m = int(channel_multiple)
    channels = round(ratio * F / m) * m
    ch_max = ((F - 1) // m) * m
    if channels > ch_max:
        if not clamp:
            raise ConfigError(
                f"{where}ratio {ratio:g} would remove {channels} of {F} MLP channels "
                "and leave the layer with none"
            )
        channels = ch_max
        clamped.append("channels")
    return heads, kv, channels, clamped


def plan_from_ratios(
    ratios: Sequence[float],
    specs: Sequence[LayerSpec],
    total_params: int,
    importance: Sequence[float] | None = None,
    head_mode: str = "uniform",
    channel_multiple: int = 1,
    recovery: str = "affine",
    clamp: bool = True,
    base_ratio: float = 0.0,
    target_ratio: float | None = None,
) -> RatioPlan:
    """The plan and exact parameter count for given per-layer ratios r_i."""
    if len(ratios) != len(specs):
        raise ConfigError(f"{len(ratios)} layer ratios given for a model of {len(specs)} layers")
    layers = []
    after = int(total_params)
    for i, (r, spec) in enumerate(zip(ratios, specs)):
        heads, kv, ch, clamped = removal_counts(
            r, spec, head_mode, channel_multiple, clamp=clamp, layer=i
        )
        add_o = recovery != "none" and heads > 0 and not spec.o_bias
        add_down = recovery != "none" and ch > 0 and not spec.down_bias
        plan = LayerPlan(
            index=i,
            importance=None if importance is None else float(importance[i]),
            ratio=float(r),
            heads_removed=heads,
            kv_heads_removed=kv,
            channels_removed=ch,
            clamped=clamped,
            o_bias_added=add_o,
            down_bias_added=add_down,
        )
        after += linear_parameters(spec, heads, kv, ch, add_o, add_down) - linear_parameters(spec)
        layers.append(plan)
    return RatioPlan(layers, float(base_ratio), target_ratio, int(total_params), after)


def plan_from_layer_ratios(
    ratios: Sequence[float],
    specs: Sequence[LayerSpec],
    total_params: int,
    importance: Sequence[float] | None = None,
    head_mode: str = "uniform",
    channel_multiple: int = 1,
    recovery: str = "affine",
) -> RatioPlan:
    """Explicit per-layer ratios (no allocation, no clamping): a ratio that would leave a layer
    without heads or channels raises ConfigError naming the layer."""
    for i, r in enumerate(ratios):
        if not (0 <= r < 1):
            raise ConfigError(f"layer {i}: ratio must be in [0, 1), got {r}")
    return plan_from_ratios(
        ratios, specs, total_params, importance, head_mode, channel_multiple, recovery, clamp=False
    )


def plan_for_target(
    target: float,
    importance: Sequence[float],
    specs: Sequence[LayerSpec],
    total_params: int,
    pruned_layers: int | None = None,
    alpha: float = 10.0,
    head_mode: str = "uniform",
    channel_multiple: int = 1,
    recovery: str = "affine",
    iterations: int = 100,
) -> RatioPlan:
    """Find the base ratio R whose plan removes the fraction ``target`` of all parameters.

    The removed count is a non-decreasing step function of R; bisection brackets the step that
    crosses ``target`` and the closer of its two sides is returned (the upper one on a tie).

    Raises:
        ConfigError: target outside [0, 1), or larger than what the model can give with every
            pruned block at its keep-one-head-per-group / keep-one-channel limit (the message
            gives that maximum).
    """
    if not (0 <= target < 1):
        raise ConfigError(f"ratio must be in [0, 1), got {target}")

    def plan(R: float) -> RatioPlan:
        ratios = allocate_ratios(importance, R, pruned_layers, alpha)
        return plan_from_ratios(
            ratios, specs, total_params, importance, head_mode, channel_multiple, recovery,
            base_ratio=R, target_ratio=target,
        )

    zero = plan(0.0)
    if target == 0:
        return zero
    # R large enough that every chosen block sits at its limits.
    probe = allocate_ratios(importance, 1.0, pruned_layers, alpha)
    smallest = min(r for r in probe if r > 0)
    hi_R = 2.0 / smallest
    hi = plan(hi_R)
    if hi.achieved_ratio < target:
        raise ConfigError(
            f"cannot remove {target:.2%} of the parameters: at most {hi.achieved_ratio:.2%} "
            f"({hi.params_removed} of {hi.params_before}) can go while every pruned layer keeps "
            "one query head per KV group and one MLP channel"
        )
    lo_R, lo = 0.0, zero
    for _ in range(iterations):
        mid_R = 0.5 * (lo_R + hi_R)
        if mid_R in (lo_R, hi_R):
            break
        mid = plan(mid_R)
        if mid.achieved_ratio >= target:
            hi_R, hi = mid_R, mid
        else:
            lo_R, lo = mid_R, mid
    if target - lo.achieved_ratio < hi.achieved_ratio - target:
        return lo
    return hi
