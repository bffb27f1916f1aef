"""Architecture registry: where each model family keeps its decoder layers and projections.

slimllm prunes the two structures every supported family shares (DESIGN.md sections 1-3):

- attention: ``q_proj`` / ``k_proj`` / ``v_proj`` (rows = heads x head_dim) and ``o_proj``
  (columns = heads x head_dim), with grouped-query attention (GQA): query head ``a`` reads
  key/value head ``a // (H / G)`` (DESIGN.md section 2, GQA);
- gated MLP (SwiGLU; GeGLU for Gemma): ``gate_proj`` / ``up_proj`` (rows = channels) and
  ``down_proj`` (columns = channels) (DESIGN.md section 3).

Families, keyed by ``config.model_type`` (transformers 5.x modeling code):

===========  ============================================================================
llama        Llama 1/2/3, SmolLM/SmolLM2, TinyLlama, ... (optional ``attention_bias`` /
             ``mlp_bias``)
mistral      same layout as llama, no biases
qwen2        q/k/v carry biases, o_proj and the MLP do not
qwen3        explicit ``head_dim``; ``q_norm``/``k_norm`` are RMSNorms of size ``head_dim`` shared
             by all heads, so they are untouched when heads are removed
granite      Llama layout (optional ``attention_bias``/``mlp_bias``) with scalar
             ``embedding_multiplier``/``residual_multiplier``/``attention_multiplier``/
             ``logits_scaling``, which do not depend on head or channel counts
gemma        Gemma 1: explicit ``head_dim`` (256 on the real models, not hidden / heads),
             ``1 + weight`` RMSNorms, GeGLU MLP (``gelu_pytorch_tanh`` on gate), embeddings
             scaled by sqrt(hidden) inside the embedding module, tied LM head
gemma2       Gemma 1's layout plus "sandwich" norms: ``post_attention_layernorm`` normalises
             the o_proj output and ``post_feedforward_layernorm`` the down_proj output before
             their residual adds (``pre_feedforward_layernorm`` is the MLP's input norm), so
             the recovery fits o_proj / down_proj outputs *before* those norms, the last
             linear map of each branch; attention and final logit soft-capping, score scaling
             ``query_pre_attn_scalar ** -0.5`` and sliding-window layers (``layer_types``)
             are per-head or per-layer and do not depend on head or channel counts
gemma3_text  Gemma 3 (text decoder, ``Gemma3ForCausalLM``): Gemma 2's layout plus
             ``q_norm``/``k_norm`` of size ``head_dim`` shared by all heads (as in qwen3)
             and separate rotary embeddings for sliding and global layers; the multimodal
             ``gemma3`` (``Gemma3ForConditionalGeneration``) is not supported
olmo2        OLMo 2 (``Olmo2ForCausalLM``): no input norms, only post norms
             (``post_attention_layernorm`` on the o_proj output, ``post_feedforward_layernorm``
             on the down_proj output, before the residual adds; the recovery fits the
             projections' outputs before them, as for gemma2); ``q_norm``/``k_norm`` are
             RMSNorms over the *whole* q_proj / k_proj output (H*h and G*h), so they are
             sliced with the heads and the o_proj recovery is fitted on the outputs of the
             sliced attention (``width_norms``, :class:`Olmo2Adapter`)
===========  ============================================================================

Checkpoints slimllm saves with per-layer shapes use the model types ``slimllm_<family>``
(see :mod:`slimllm.families.modeling_slimllm`); they map to the same adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from slimllm.errors import UnsupportedArchitectureError

__all__ = [
    "LayerShape",
    "ModelAdapter",
    "get_adapter",
    "supported_architectures",
    "model_type_of",
    "REMOTE_MODEL_TYPE_PREFIX",
]

#: Prefix of the ``model_type`` of slimllm checkpoints with per-layer shapes (remote code).
REMOTE_MODEL_TYPE_PREFIX = "slimllm_"


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer (DESIGN.md notation: H, G, h, F).

    ``num_heads`` query heads (H), ``num_kv_heads`` key/value heads (G, divides H),
    ``head_dim`` (h), ``intermediate_size`` MLP channels (F). ``num_heads * head_dim`` is the
    o_proj input width D.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def attention_width(self) -> int:
        """D = H * h, the q_proj output / o_proj input width."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """G * h, the k_proj / v_proj output width."""
        return self.num_kv_heads * self.head_dim


class ModelAdapter:
    """Where one model family keeps its decoder layers and projections.

    The default implementation fits every Llama-like family (``model.model.layers[i]`` with
    ``.self_attn`` and ``.mlp``); subclasses override what differs.
    """

    name: str = "llama"
    #: projections of the attention module, in q, k, v, o order
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: projections of the MLP, in gate, up, down order
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    #: per-head modules of size head_dim shared by all heads (qwen3: q_norm, k_norm)
    shared_head_norms: tuple[str, ...] = ()
    #: norms of the attention over the whole output of a projection (olmo2: q_norm over the
    #: H*h q_proj outputs, k_norm over the G*h k_proj outputs), as (norm, projection) pairs:
    #: their weights are sliced with the projection's rows, and since their RMS is taken over
    #: the kept heads only, removing heads changes the kept heads' outputs; the pipeline then
    #: fits the o_proj recovery on the outputs of the sliced attention
    width_norms: tuple[tuple[str, str], ...] = ()

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (``LlamaModel`` etc.) of a ``*ForCausalLM`` or of itself."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            return inner
        if hasattr(model, "layers"):
            return model
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder layers where the {self.name} adapter looks "
            "for them (model.model.layers)"
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, a ``ModuleList`` of length ``config.num_hidden_layers``."""
        return self.base_model(model).layers

    def layers_prefix(self, model: nn.Module) -> str:
        """State-dict name of the decoder layer list (``"model.layers"``): layer i's tensors
        are ``f"{prefix}.{i}.NAME"``."""
        return "model.layers" if self.base_model(model) is getattr(model, "model", None) else "layers"

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer (has q_proj, k_proj, v_proj, o_proj)."""
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP module of a decoder layer (has gate_proj, up_proj, down_proj)."""
        return layer.mlp

    def head_dim(self, layer: nn.Module) -> int:
        """h, the size of one head (``attention.head_dim``)."""
        attn = self.attention(layer)
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:  # pragma: no cover - every supported family sets it
            config = attn.config
            head_dim = getattr(config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
        return int(head_dim)

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        """The current shape of a decoder layer, read from its Linear modules (not the config,
        which keeps the dense template values while layers are being pruned)."""
        attn = self.attention(layer)
        mlp = self.mlp(layer)
        h = self.head_dim(layer)
        return LayerShape(
            num_heads=attn.q_proj.out_features // h,
            num_kv_heads=attn.k_proj.out_features // h,
            head_dim=h,
            intermediate_size=mlp.gate_proj.out_features,
        )

    def layer_shapes(self, model: nn.Module) -> list[LayerShape]:
        """``layer_shape`` of every decoder layer, in order."""
        return [self.layer_shape(layer) for layer in self.layers(model)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class LlamaAdapter(ModelAdapter):
    """Llama family (also SmolLM2, whose config is a LlamaConfig)."""

    name = "llama"


class MistralAdapter(ModelAdapter):
    """Mistral: Llama layout without biases."""

    name = "mistral"


class Qwen2Adapter(ModelAdapter):
    """Qwen2: q/k/v biases (sliced with their rows)."""

    name = "qwen2"


class Qwen3Adapter(ModelAdapter):
    """Qwen3: explicit head_dim and per-head q_norm/k_norm of size head_dim, shared by heads."""

    name = "qwen3"
    shared_head_norms = ("q_norm", "k_norm")


class GraniteAdapter(ModelAdapter):
    """Granite: Llama layout with scalar multipliers (untouched by pruning)."""

    name = "granite"


class GemmaAdapter(ModelAdapter):
    """Gemma 1: Llama layout with GeGLU MLP and ``1 + weight`` RMSNorms (untouched by pruning)."""

    name = "gemma"


class Gemma2Adapter(ModelAdapter):
    """Gemma 2: Gemma layout with sandwich norms, soft-capping and sliding-window layers; the
    o_proj / down_proj recovery targets the projections' outputs, before the post norms."""

    name = "gemma2"


class Gemma3TextAdapter(ModelAdapter):
    """Gemma 3 text decoder: Gemma 2 layout plus q_norm/k_norm of size head_dim, shared by heads."""

    name = "gemma3_text"
    shared_head_norms = ("q_norm", "k_norm")


class Olmo2Adapter(ModelAdapter):
    """OLMo 2: post norms only (the recovery targets the o_proj / down_proj outputs before
    ``post_attention_layernorm`` / ``post_feedforward_layernorm``, as for Gemma 2) and
    ``q_norm`` / ``k_norm`` RMSNorms over the whole q_proj (H*h) / k_proj (G*h) output.

    Removing heads slices those norms' weights with the kept rows, and their RMS is then taken
    over the kept heads only: every kept head's queries (and keys, when KV heads go) are
    rescaled per token, so the kept heads' o_proj inputs differ from the dense ones. The o_proj
    recovery is therefore fitted on the o_proj inputs of the *sliced* attention, run on the
    calibration inputs, against the dense o_proj output (``width_norms``; pipeline pass 1b).

    Head scoring and the greedy swap still use the dense model's o_proj input moments
    (DESIGN.md section 2), which assume the kept heads' outputs do not change when others are
    removed. For OLMo 2 they do change (the rescaled queries / keys change the attention
    weights), so the scores rate how well the kept heads' *dense* outputs reproduce the full
    output, not the outputs they have once sliced: the selection is an approximation, the
    recovery fit is exact for the heads selected.
    """

    name = "olmo2"
    width_norms = (("q_norm", "q_proj"), ("k_norm", "k_proj"))


_REGISTRY: dict[str, ModelAdapter] = {
    adapter.name: adapter
    for adapter in (
        LlamaAdapter(),
        MistralAdapter(),
        Qwen2Adapter(),
        Qwen3Adapter(),
        GraniteAdapter(),
        GemmaAdapter(),
        Gemma2Adapter(),
        Gemma3TextAdapter(),
        Olmo2Adapter(),
    )
}


def supported_architectures() -> list[str]:
    """The ``model_type`` values slimllm has adapters for, sorted."""
    return sorted(_REGISTRY)


def model_type_of(model_or_config: Any) -> str:
    """``model_type`` of a model, a config, a config dict or a string; ``slimllm_<family>`` is
    reported as ``<family>``. Raises UnsupportedArchitectureError when there is none."""
    obj = model_or_config
    if isinstance(obj, str):
        model_type = obj
    else:
        if isinstance(obj, dict):
            model_type = obj.get("model_type")
        else:
            config = getattr(obj, "config", obj)
            if hasattr(config, "get_text_config"):
                try:
                    config = config.get_text_config(decoder=True)
                except (TypeError, ValueError):  # pragma: no cover - older signatures
                    config = config.get_text_config()
            model_type = getattr(config, "model_type", None)
        if not model_type:
            raise UnsupportedArchitectureError(
                f"cannot tell the architecture of {type(obj).__name__} (no config.model_type); "
                f"supported: {', '.join(supported_architectures())}"
            )
    if model_type.startswith(REMOTE_MODEL_TYPE_PREFIX):
        model_type = model_type[len(REMOTE_MODEL_TYPE_PREFIX) :]
    return model_type


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model, a config (or config dict), or a ``model_type`` string.

    Keyed by ``config.model_type``: ``llama`` (SmolLM2 too), ``mistral``, ``qwen2``, ``qwen3``,
    ``granite``, ``gemma``, ``gemma2``, ``gemma3_text``, ``olmo2`` and their slimllm per-layer variants
    ``slimllm_<family>``.

    Raises:
        UnsupportedArchitectureError: any other family; the message names the architecture
            and lists the supported ones.
    """
    model_type = model_type_of(model_or_config)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported by slimllm; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return adapter
