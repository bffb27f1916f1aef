"""The plain Llama block that the serving exports write (llama.cpp's ``llama`` / ``deci``
archs in :mod:`slimllm.io.gguf_export`, vLLM's Nemotron-NAS in :mod:`slimllm.io.vllm_export`):
the checks a model must pass to be written that way, and its state dict in that layout.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from slimllm.errors import UnsupportedArchitectureError

__all__ = ["check_rotary", "llama_block_state", "unwindowed_context_length"]

logger = logging.getLogger(__name__)


def check_rotary(config: Any, where: str) -> None:
    """Raise UnsupportedArchitectureError (message prefixed by ``where``) for RoPE over part of
    each head (Phi-4-mini's ``partial_rotary_factor`` < 1, in ``config.rope_parameters`` or on
    the config): llama.cpp's ``llama`` / ``deci`` rotate the whole head, and the vLLM export is
    proven with whole-head RoPE only (GGUF and vLLM exports both call this)."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if factor is not None and float(factor) != 1.0:
        raise UnsupportedArchitectureError(
            f"{where}: partial rotary embedding (partial_rotary_factor {factor}) is not exported "
            "(llama.cpp's llama / deci archs rotate the whole head)"
        )


def unwindowed_context_length(config: Any) -> int:
    """``max_position_embeddings``, capped at ``sliding_window`` when the config has one: the
    exported archs (llama.cpp's llama / deci, vLLM's Nemotron-NAS) have no sliding window, and
    within that context it masks nothing (transformers' window: key positions > query - W)."""
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window is not None and int(window) < context:
        logger.warning(
            "sliding_window %d < max_position_embeddings %d: the exported context length is %d, "
            "within which the window masks nothing", window, context, window
        )
        return int(window)
    return context


def llama_block_state(model: Any, adapter: Any, shapes: list) -> tuple[dict[str, torch.Tensor], bool]:
    """``model``'s tensors in the plain Llama layout, and whether its lm_head stays tied.

    Detached state dict of ``model`` (a family of ``adapter``, layer i of shape ``shapes[i]``)
    with fused projections split (:func:`~slimllm.families.adapters.split_fused_state`) and the
    family's scalar multipliers folded into the weights (``adapter.fold_multipliers``). A tied
    lm_head is left out (the engines reuse the embedding) unless the fold untied it.

    Returns:
        ``(state, tied)``: tensors keyed as in a Llama state dict; ``tied`` is true when
        ``lm_head.weight`` is absent because it is the embedding.
    """
    from slimllm.families.adapters import split_fused_state

    config = model.config
    prefix = adapter.layers_prefix(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    split_fused_state(state, adapter, prefix, shapes, int(config.hidden_size))
    if adapter.fold_multipliers(state, config, prefix, shapes[0].head_dim):
        tied = False
    return state, tied
