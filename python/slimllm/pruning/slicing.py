"""In-place surgery on one decoder layer: keep heads / KV heads / MLP channels, set weights and
biases (DESIGN.md sections 1-3, the "slice" steps).

Every function replaces the affected projections with new, smaller ``nn.Linear`` modules (right
``in_features``/``out_features``, same dtype and device, ``requires_grad`` kept) and updates the
module attributes transformers' attention forward reads (``num_key_value_groups``; ``head_dim``
and ``scaling`` are unchanged since heads keep their size). Hooks registered on the old Linear
modules are therefore gone: register hooks after slicing.

The model config is the *dense template* while layers are being pruned: slicing never changes
``config.num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` (no single
value describes per-layer shapes, and nothing in transformers' forward or ``generate()`` reads
them after construction). It only makes ``config.head_dim`` explicit, since
``hidden_size // num_attention_heads`` is no longer the head size once heads are gone. Read
shapes with ``adapter.layer_shape(layer)``; :func:`slimllm.io.checkpoint.save_pruned` writes the
right config.

All index and shape checks run before any module is changed: a failing call leaves the layer
as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from slimllm.families.adapters import LayerShape, ModelAdapter
from slimllm.errors import InvalidCountError, NonFiniteError, ShapeMismatchError

__all__ = ["keep_heads", "keep_channels", "set_linear", "head_rows"]


def _indices(values: Iterable[int] | torch.Tensor | np.ndarray, limit: int, what: str) -> list[int]:
    """Sorted unique ints in [0, limit); InvalidCountError otherwise (including empty)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidCountError(f"{what}: index {v!r} is not an integer")
        out.append(int(v))
    if not out:
        raise InvalidCountError(f"{what}: nothing kept (at least one is required)")
    if len(set(out)) != len(out):
        raise InvalidCountError(f"{what}: duplicate indices in {sorted(out)}")
    bad = [v for v in out if v < 0 or v >= limit]
    if bad:
        raise InvalidCountError(f"{what}: indices {bad} outside [0, {limit})")
    return sorted(out)


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a projection: ``a*h .. (a+1)*h`` for each
    head ``a`` in order, as an int64 tensor of length ``len(heads) * head_dim``."""
    heads_t = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads_t[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding ``linear.weight[rows][:, cols]`` (and ``bias[rows]``)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        idx = rows.to(weight.device)
        weight = weight.index_select(0, idx)
        if bias is not None:
            bias = bias.index_select(0, idx)
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _slice_norm(norm: nn.Module, rows: torch.Tensor) -> None:
    """Keep the entries ``rows`` of a norm's ``weight`` (and ``bias`` where it has one)."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if param is not None:
            kept = param.detach().index_select(0, rows.to(param.device)).contiguous()
            setattr(norm, name, nn.Parameter(kept, requires_grad=param.requires_grad))


def _make_head_dim_explicit(attn: nn.Module, head_dim: int) -> None:
    config = getattr(attn, "config", None)
    if config is not None and getattr(config, "head_dim", None) != head_dim:
        config.head_dim = head_dim


def _slice_layer(adapter: ModelAdapter, layer: nn.Module, shape: LayerShape,
                 kept_rows: dict[str, torch.Tensor], last: str, kept_cols: torch.Tensor) -> None:
    """Replace every Linear module of ``layer`` (fused ones included) by its sliced copy: the
    output rows of the logical projections in ``kept_rows`` (name -> kept row indices within
    that projection, e.g. ``{"q_proj": rows}``) and the input columns ``kept_cols`` of the
    branch's last projection ``last`` (``"o_proj"`` or ``"down_proj"``). ``shape`` is the
    layer's shape before slicing; the hidden size is ``last``'s output width."""
    last_linear, _ = adapter.projection(layer, last)
    hidden = last_linear.out_features
    for qualified, parts in adapter.linear_modules().items():
        rows = adapter.rows_to_keep(shape, hidden, qualified, kept_rows)
        if rows is not None:
            adapter.set_linear_module(layer, qualified, _sliced_linear(adapter.linear(layer, qualified), rows=rows))
        elif last in parts:
            adapter.set_linear_module(layer, qualified, _sliced_linear(last_linear, cols=kept_cols))


def keep_heads(
    adapter: ModelAdapter,
    layer: nn.Module,
    kept_heads: Sequence[int],
    kept_kv_heads: Sequence[int] | None = None,
) -> None:
    """Keep only the query heads ``kept_heads`` of ``layer`` (DESIGN.md section 2).

    ``q_proj`` keeps rows (and bias entries) ``a*h..(a+1)*h`` of every kept head ``a``,
    ``o_proj`` keeps the same columns (its bias is untouched). Key/value heads: query head ``a``
    reads KV head ``a // (H/G)``, and transformers needs every KV head to serve the same number
    of query heads after pruning, so every kept KV group must keep the same count of query heads.

    - ``kept_kv_heads=None``: KV heads with at least one kept query head are kept (all of them
      in the "uniform" GQA mode; for MHA, where H == G, the pruned heads' K/V rows go with them).
    - ``kept_kv_heads`` given ("kv-group" mode): ``k_proj``/``v_proj`` keep the rows (and bias
      entries) of those KV heads only; every kept query head must belong to a kept KV head.

    A fused module (Phi-3's ``qkv_proj``) keeps the same rows of each of its parts
    (``adapter.rows_to_keep``). Indices refer to the layer's *current* heads (0..H-1, 0..G-1);
    order does not matter (they are sorted). ``attention.num_key_value_groups`` becomes H'/G'
    (and ``num_heads`` / ``num_key_value_heads`` where the module has them); for a family with
    ``adapter.layer_config_fields`` (Phi-3) the attention module's ``config`` becomes a
    per-layer view with H' / G' (:class:`slimllm.families.modeling_slimllm.LayerConfig`);
    ``config.head_dim`` becomes explicit. Qwen3's ``q_norm``/``k_norm`` (size head_dim,
    shared by heads) are untouched; norms over a projection's whole output
    (``adapter.width_norms``, OLMo 2's ``q_norm``/``k_norm``) keep the weight entries of that
    projection's kept rows.

    Raises:
        InvalidCountError: empty, duplicate or out-of-range indices; kept query heads of a
            dropped KV head; KV groups left with different numbers of query heads.
        ShapeMismatchError: a width norm whose size is not its projection's output count.
    """
    attn = adapter.attention(layer)
    shape = adapter.layer_shape(layer)
    h, num_heads, num_kv = shape.head_dim, shape.num_heads, shape.num_kv_heads
    if num_heads % num_kv:
        raise InvalidCountError(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    group = num_heads // num_kv
    heads = _indices(kept_heads, num_heads, "kept_heads")
    per_group = {}
    for a in heads:
        per_group[a // group] = per_group.get(a // group, 0) + 1
    if kept_kv_heads is None:
        kv_heads = sorted(per_group)
    else:
        kv_heads = _indices(kept_kv_heads, num_kv, "kept_kv_heads")
        orphans = sorted(a for a in heads if a // group not in kv_heads)
        if orphans:
            raise InvalidCountError(
                f"kept query heads {orphans} read KV heads {sorted({a // group for a in orphans})} "
                f"that kept_kv_heads {kv_heads} drops"
            )
    counts = {g: per_group.get(g, 0) for g in kv_heads}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InvalidCountError(
            f"every kept KV head must keep the same (non-zero) number of query heads; kept query "
            f"heads per KV head: {counts} (KV group size {group})"
        )

    from slimllm.families.modeling_slimllm import set_attention_heads

    for norm_name, projection in adapter.width_norms:
        width = getattr(attn, norm_name).weight.shape[0]
        rows = adapter.projection(layer, projection)[1]
        if width != rows.stop - rows.start:
            raise ShapeMismatchError(
                f"{norm_name} has {width} weights, {projection} {rows.stop - rows.start} outputs"
            )

    q_rows = head_rows(heads, h)
    kept_rows = {"q_proj": q_rows}
    if len(kv_heads) != num_kv:
        kv_rows = head_rows(kv_heads, h)
        kept_rows |= {"k_proj": kv_rows, "v_proj": kv_rows}
    _slice_layer(adapter, layer, shape, kept_rows, "o_proj", q_rows)
    for norm_name, projection in adapter.width_norms:
        if projection in kept_rows:
            _slice_norm(getattr(attn, norm_name), kept_rows[projection])
    set_attention_heads(attn, len(heads), len(kv_heads), adapter.layer_config_fields)
    _make_head_dim_explicit(attn, h)


def keep_channels(adapter: ModelAdapter, layer: nn.Module, kept_channels: Sequence[int]) -> None:
    """Keep only the MLP channels ``kept_channels`` of ``layer`` (DESIGN.md section 3).

    ``gate_proj`` and ``up_proj`` keep those rows (and bias entries; both halves of a fused
    ``gate_up_proj`` alike), ``down_proj`` those columns (its bias is untouched).
    ``mlp.intermediate_size`` becomes the kept count.

    Raises:
        InvalidCountError: empty, duplicate or out-of-range channel indices.
        ShapeMismatchError: gate, up and down disagree on the intermediate size.
    """
    mlp = adapter.mlp(layer)
    gate, gate_rows = adapter.projection(layer, "gate_proj")
    up, up_rows = adapter.projection(layer, "up_proj")
    down, _ = adapter.projection(layer, "down_proj")
    width = gate_rows.stop - gate_rows.start
    channels = _indices(kept_channels, width, "kept_channels")
    if up_rows.stop - up_rows.start != width or down.in_features != width:
        raise ShapeMismatchError(
            f"MLP projections disagree on the intermediate size: gate {width}, "
            f"up {up_rows.stop - up_rows.start}, down {down.in_features}"
        )
    idx = torch.as_tensor(channels, dtype=torch.long)
    kept_rows = {"gate_proj": idx, "up_proj": idx}
    _slice_layer(adapter, layer, adapter.layer_shape(layer), kept_rows, "down_proj", idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def _as_tensor(value: Any, like: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tuple(tensor.shape) != shape:
        raise ShapeMismatchError(f"{what} has shape {tuple(tensor.shape)}, expected {shape}")
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise NonFiniteError(f"{what} has {int((~finite).sum())} non-finite values")
    return tensor.to(device=like.device, dtype=like.dtype).contiguous()


def set_linear(linear: nn.Linear, weight: Any = None, bias: Any = None) -> None:
    """Replace the weight and/or the bias of ``linear`` in place (e.g. the recovery step's
    scaled o_proj/down_proj rows and bias, DESIGN.md sections 2-3).

    ``weight``: (out_features, in_features), ``bias``: (out_features,); torch tensors or numpy
    arrays of any float dtype (the core returns float64), converted to the layer's dtype and
    device. A Linear without a bias gets a new bias Parameter.

    Raises:
        ShapeMismatchError: a shape other than the layer's current one.
        NonFiniteError: NaN or infinite values (nothing is changed).
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"set_linear expects an nn.Linear, got {type(linear).__name__}")
    like = linear.weight
    out_features, in_features = like.shape
    new_weight = None if weight is None else _as_tensor(weight, like, (out_features, in_features), "weight")
    new_bias = None if bias is None else _as_tensor(bias, like, (out_features,), "bias")
    with torch.no_grad():
        if new_weight is not None:
            linear.weight = nn.Parameter(new_weight, requires_grad=like.requires_grad)
        if new_bias is not None:
            linear.bias = nn.Parameter(new_bias, requires_grad=like.requires_grad)
