"""Masked (dense-shaped) reference of head removal under norms over a whole projection
(``adapter.width_norms``: OLMo 2's q_norm over the H*h q_proj outputs, k_norm over the G*h
k_proj outputs), for the tests that compare a sliced model with a masked one.

Sliced, such a norm takes its mean square over the kept heads' rows only. On the dense shapes
the same numbers come out of the stock forward when the removed rows of the projection are
zeroed, the kept rows multiplied by s = sqrt(rows / kept rows) and the norm's kept weights
divided by s: the mean square over all rows is then (1 / rows) s^2 sum_kept q^2, the kept rows'
mean square, and each kept output is w / s * s q / rms_kept = w q / rms_kept. Nothing of
slimllm's slicing is used; the removed heads' outputs are left for the caller to cancel (o_proj
columns zeroed, or values zeroed for removed KV heads).
"""

from __future__ import annotations

import math

import torch

from slimllm.pruning.slicing import head_rows


def mask_width_norms(adapter, attn, kept_heads, kept_kv_heads, head_dim: int) -> None:
    """Apply the module docstring's rescaling in place to the dense attention module ``attn``
    of ``adapter``'s family, for the kept query heads ``kept_heads`` and kept KV heads
    ``kept_kv_heads`` (a no-op for families without width norms and for projections that keep
    every row)."""
    kept_rows = {"q_proj": kept_heads, "k_proj": kept_kv_heads, "v_proj": kept_kv_heads}
    for norm_name, projection in adapter.width_norms:
        linear, norm = getattr(attn, projection), getattr(attn, norm_name)
        rows = head_rows(sorted(kept_rows[projection]), head_dim)
        if len(rows) == linear.out_features:
            continue
        s = math.sqrt(linear.out_features / len(rows))
        factor = torch.zeros(linear.out_features, dtype=linear.weight.dtype)
        factor[rows] = s
        with torch.no_grad():
            linear.weight.mul_(factor[:, None])
            if linear.bias is not None:
                linear.bias.mul_(factor)
            norm.weight[rows] /= s
