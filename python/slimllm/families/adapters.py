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
phi3         Phi-3 / Phi-3.5 / Phi-4-mini (``Phi3ForCausalLM``): fused ``self_attn.qkv_proj``
             (rows: q [H*h], k [G*h], v [G*h]) and fused ``mlp.gate_up_proj`` (rows: gate [F],
             up [F]; activation on gate), no biases; the attention forward splits qkv with
             ``config.num_attention_heads`` / ``config.num_key_value_heads``, so a pruned
             layer's attention reads a per-layer config view (``layer_config_fields``);
             ``partial_rotary_factor`` (Phi-4-mini) is a fraction of head_dim, unaffected
olmo2        OLMo 2 (``Olmo2ForCausalLM``): no input norms, only post norms
             (``post_attention_layernorm`` on the o_proj output, ``post_feedforward_layernorm``
             on the down_proj output, before the residual adds; the recovery fits the
             projections' outputs before them, as for gemma2); ``q_norm``/``k_norm`` are
             RMSNorms over the *whole* q_proj / k_proj output (H*h and G*h), so they are
             sliced with the heads and the o_proj recovery is fitted on the outputs of the
             sliced attention (``width_norms``, :class:`Olmo2Adapter`)
===========  ============================================================================

Fused projections are declared per family (``fused_projections``); everything else reads the
logical projections (``q_proj`` ... ``down_proj``) through :meth:`ModelAdapter.linear_modules`,
:meth:`ModelAdapter.projection` and :meth:`ModelAdapter.rows_to_keep`, never the modules
directly, so a dense family with another layout is a table entry here.

Checkpoints slimllm saves with per-layer shapes use the model types ``slimllm_<family>``
(see :mod:`slimllm.families.modeling_slimllm`); they map to the same adapters.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimllm.errors import UnsupportedArchitectureError

__all__ = [
    "FusedProjection",
    "LayerShape",
    "ModelAdapter",
    "get_adapter",
    "projection_size",
    "split_fused_state",
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


@dataclass(frozen=True)
class FusedProjection:
    """One Linear module holding several logical projections stacked along its output rows.

    ``module``: its attribute name on the attention / MLP module (Phi-3: ``"qkv_proj"``);
    ``parts``: the logical projections it holds, in row order (``("q_proj", "k_proj",
    "v_proj")``), each with the rows it would have as a module of its own.
    """

    module: str
    parts: tuple[str, ...]


#: the owner of each logical projection inside a decoder layer (state-dict prefix)
_OWNER = {name: "self_attn" for name in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    name: "mlp" for name in ("gate_proj", "up_proj", "down_proj")
}


def projection_size(shape: LayerShape, hidden: int, name: str) -> tuple[int, int]:
    """(output rows, input features) of the logical projection ``name`` (``"q_proj"`` ...
    ``"down_proj"``) of a decoder layer of ``shape`` with hidden size ``hidden``, as a Linear
    module of its own (DESIGN.md notation): q H*h x d, k/v G*h x d, o d x H*h, gate/up F x d,
    down d x F.

    Raises:
        KeyError: ``name`` is not a logical projection.
    """
    q, kv, f = shape.attention_width, shape.kv_width, shape.intermediate_size
    return {
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, q),
        "gate_proj": (f, hidden),
        "up_proj": (f, hidden),
        "down_proj": (hidden, f),
    }[name]


def split_fused_state(
    state: dict[str, torch.Tensor], adapter: "ModelAdapter", prefix: str, shapes: list[LayerShape], hidden: int
) -> None:
    """Split every fused Linear module's tensors in ``state`` (a state dict, modified in place)
    into its logical projections' (Phi-3: ``{prefix}.{i}.self_attn.qkv_proj.weight`` becomes
    ``...self_attn.q_proj.weight``, ``k_proj``, ``v_proj``; ``mlp.gate_up_proj`` becomes
    ``gate_proj``, ``up_proj``), by rows: each part's output size in layer i of shape
    ``shapes[i]`` (:func:`projection_size`). Biases split the same way; the split tensors are
    copies (own storage, so safetensors can save them). A family without fused modules leaves
    ``state`` as it is.

    Raises:
        RuntimeError: a fused tensor whose rows are not the sum of its parts' (torch.split).
    """
    for i, shape in enumerate(shapes):
        for qualified, parts in adapter.linear_modules().items():
            if len(parts) == 1:
                continue
            owner = qualified.rsplit(".", 1)[0]
            sizes = [projection_size(shape, hidden, part)[0] for part in parts]
            for suffix in ("weight", "bias"):
                fused = state.pop(f"{prefix}.{i}.{qualified}.{suffix}", None)
                if fused is None:
                    continue
                for part, rows in zip(parts, torch.split(fused, sizes, dim=0), strict=True):
                    state[f"{prefix}.{i}.{owner}.{part}.{suffix}"] = rows.clone()


class ModelAdapter:
    """Where one model family keeps its decoder layers and projections.

    The default implementation fits every Llama-like family (``model.model.layers[i]`` with
    ``.self_attn`` and ``.mlp``, one Linear module per logical projection); subclasses
    override what differs, fused projections included (``fused_projections``).
    """

    name: str = "llama"
    #: logical projections of the attention module, in q, k, v, o order
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: logical projections of the MLP, in gate, up, down order
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    #: Linear modules holding several logical projections (Phi-3: qkv_proj, gate_up_proj)
    fused_projections: tuple[FusedProjection, ...] = ()
    #: per-head modules of size head_dim shared by all heads (qwen3: q_norm, k_norm)
    shared_head_norms: tuple[str, ...] = ()
    #: config fields the attention forward reads that must be the layer's own once its heads
    #: are pruned (Phi-3: the query / key-value head counts splitting qkv_proj); the pruned
    #: attention module gets a per-layer config view with them
    #: (:class:`slimllm.families.modeling_slimllm.LayerConfig`)
    layer_config_fields: tuple[str, ...] = ()

    def linear_modules(self) -> Mapping[str, tuple[str, ...]]:
        """The Linear modules of a decoder layer, ``"self_attn.q_proj"`` ... ``"mlp.down_proj"``
        (owner and attribute, as in the state dict) -> the logical projections each holds, in
        row order (a plain module: itself; Phi-3's ``"self_attn.qkv_proj"``: ``("q_proj",
        "k_proj", "v_proj")``). Attention modules first, in q ... down order. Read-only, built
        once per adapter from its class attributes."""
        return self._linear_table

    @functools.cached_property
    def _linear_table(self) -> Mapping[str, tuple[str, ...]]:
        fused = {f.parts[0]: f for f in self.fused_projections}
        inside = {p for f in self.fused_projections for p in f.parts}
        out: dict[str, tuple[str, ...]] = {}
        for name in (*self.attention_projections, *self.mlp_projections):
            if name in fused:
                out[f"{_OWNER[name]}.{fused[name].module}"] = fused[name].parts
            elif name not in inside:
                out[f"{_OWNER[name]}.{name}"] = (name,)
        return types.MappingProxyType(out)

    def _holder(self, name: str) -> tuple[str, tuple[str, ...]]:
        """``(qualified Linear module, its parts)`` holding the logical projection ``name``."""
        for qualified, parts in self.linear_modules().items():
            if name in parts:
                return qualified, parts
        raise KeyError(f"{self.name} adapter has no projection {name!r}")

    def linear(self, layer: nn.Module, qualified: str) -> nn.Linear:
        """The Linear module ``qualified`` (a key of :meth:`linear_modules`) of ``layer``."""
        owner, attribute = qualified.split(".")
        return getattr(self.attention(layer) if owner == "self_attn" else self.mlp(layer), attribute)

    def set_linear_module(self, layer: nn.Module, qualified: str, module: nn.Module) -> None:
        """Replace the Linear module ``qualified`` (a key of :meth:`linear_modules`) of ``layer``."""
        owner, attribute = qualified.split(".")
        setattr(self.attention(layer) if owner == "self_attn" else self.mlp(layer), attribute, module)

    def linear_features(self, shape: LayerShape, hidden: int) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of every Linear module (keys of
        :meth:`linear_modules`) of a layer of ``shape`` with hidden size ``hidden``: q H*h
        outputs, k/v G*h, o H*h inputs, gate/up F outputs, down F inputs; a fused module has
        its parts' outputs stacked."""
        out = {}
        for qualified, parts in self.linear_modules().items():
            sizes = [projection_size(shape, hidden, p) for p in parts]
            out[qualified] = (sizes[0][1], sum(rows for rows, _ in sizes))
        return out

    def _part_offsets(self, shape: LayerShape, hidden: int, parts: tuple[str, ...]) -> dict[str, slice]:
        start, out = 0, {}
        for p in parts:
            rows = projection_size(shape, hidden, p)[0]
            out[p] = slice(start, start + rows)
            start += rows
        return out

    def projection(self, layer: nn.Module, name: str) -> tuple[nn.Linear, slice]:
        """The Linear module of ``layer`` holding the logical projection ``name`` (``"q_proj"``
        ... ``"down_proj"``) and the slice of its output rows (weight rows, bias entries) that
        are ``name``'s: ``weight[rows]`` is ``name``'s weight, (out, in). A plain module:
        ``slice(0, out_features)``.

        Raises:
            KeyError: ``name`` is not a projection of this family.
        """
        qualified, parts = self._holder(name)
        linear = self.linear(layer, qualified)
        shape = self.layer_shape(layer)
        hidden = self.linear(layer, self._holder("o_proj")[0]).out_features
        return linear, self._part_offsets(shape, hidden, parts)[name]

    def rows_to_keep(
        self, shape: LayerShape, hidden: int, qualified: str, kept: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """Row indices (int64) of the Linear module ``qualified`` of a layer of ``shape`` to keep
        when its logical projection ``p`` keeps the rows ``kept[p]`` (indices within ``p``);
        parts missing from ``kept`` keep every row. None when no part of it is in ``kept``."""
        parts = self.linear_modules()[qualified]
        if not any(p in kept for p in parts):
            return None
        pieces = []
        for p, rows in self._part_offsets(shape, hidden, parts).items():
            own = kept.get(p)
            local = torch.arange(rows.stop - rows.start) if own is None else own.to(torch.long)
            pieces.append(local + rows.start)
        return torch.cat(pieces)
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

    def fold_multipliers(self, state: dict[str, torch.Tensor], config: Any, prefix: str, head_dim: int) -> bool:
        """Fold the family's scalar multipliers into the tensors of ``state`` (a state dict
        with layer i's tensors under ``f"{prefix}.{i}."``, modified in place) so that the plain
        Llama block computes the model's function (for the serving exports). Returns whether
        anything was folded; the Llama layout has no multipliers, so here nothing is."""
        return False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, a ``ModuleList`` of length ``config.num_hidden_layers``."""
        return self.base_model(model).layers

    def layers_prefix(self, model: nn.Module) -> str:
        """State-dict name of the decoder layer list (``"model.layers"``): layer i's tensors
        are ``f"{prefix}.{i}.NAME"``."""
        return "model.layers" if self.base_model(model) is getattr(model, "model", None) else "layers"

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer (holds the q/k/v/o projections)."""
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP module of a decoder layer (holds the gate/up/down projections)."""
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

    def shape_from_features(self, features: Mapping[str, tuple[int, int]], head_dim: int) -> LayerShape:
        """The layer shape that Linear modules of ``(in_features, out_features)``
        ``features[qualified]`` (keys of :meth:`linear_modules`) and heads of size ``head_dim``
        stand for: H*h is o_proj's input width, F down_proj's, G*h the rows of k_proj (in a
        fused module: its rows less the query rows, shared equally by k and v). Floor
        divisions: check the result against :meth:`linear_features`."""
        width = features[self._holder("o_proj")[0]][0]
        channels = features[self._holder("down_proj")[0]][0]
        qualified, parts = self._holder("k_proj")
        rows = features[qualified][1] - width * parts.count("q_proj")
        kv_rows = rows // sum(p in ("k_proj", "v_proj") for p in parts)
        return LayerShape(
            num_heads=width // head_dim,
            num_kv_heads=kv_rows // head_dim,
            head_dim=head_dim,
            intermediate_size=channels,
        )

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        """The current shape of a decoder layer, read from its Linear modules (not the config,
        which keeps the dense template values while layers are being pruned; see
        :meth:`shape_from_features`)."""
        features = {
            qualified: (linear.in_features, linear.out_features)
            for qualified in self.linear_modules()
            for linear in (self.linear(layer, qualified),)
        }
        return self.shape_from_features(features, self.head_dim(layer))

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

    def fold_multipliers(self, state: dict[str, torch.Tensor], config: Any, prefix: str, head_dim: int) -> bool:
        """Granite (transformers' ``modeling_granite``) computes ``embed(ids) * e``
        (``embedding_multiplier``), attention scores ``q . k * a`` (``attention_multiplier``,
        in place of ``head_dim ** -0.5``), residual updates ``h + r * block(h)``
        (``residual_multiplier``) and ``lm_head(x) / s`` (``logits_scaling``). Folded, all
        linear maps: the embedding times ``e``; q_proj rows and bias times
        ``a * sqrt(head_dim)`` (RoPE is linear in q); o_proj and down_proj weights and biases
        times ``r``; lm_head divided by ``s``, written as its own tensor even when the model
        ties it to the embedding (the two no longer agree). Returns True."""
        embed_mult = float(config.embedding_multiplier)
        q_scale = float(config.attention_multiplier) * head_dim ** 0.5
        residual = float(config.residual_multiplier)
        logits = float(config.logits_scaling)
        embed = state["model.embed_tokens.weight"]
        state["lm_head.weight"] = state.get("lm_head.weight", embed) / logits
        state["model.embed_tokens.weight"] = embed * embed_mult
        for i in range(int(config.num_hidden_layers)):
            for module, scale in (("self_attn.q_proj", q_scale), ("self_attn.o_proj", residual),
                                  ("mlp.down_proj", residual)):
                for suffix in ("weight", "bias"):
                    key = f"{prefix}.{i}.{module}.{suffix}"
                    if key in state:
                        state[key] = state[key] * scale
        return True


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


class Phi3Adapter(ModelAdapter):
    """Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj; the attention forward
    splits qkv with config head counts, so pruned layers get their own config view."""

    name = "phi3"
    fused_projections = (
        FusedProjection("qkv_proj", ("q_proj", "k_proj", "v_proj")),
        FusedProjection("gate_up_proj", ("gate_proj", "up_proj")),
    )
    layer_config_fields = ("num_attention_heads", "num_key_value_heads")


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
        Phi3Adapter(),
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
    ``granite``, ``gemma``, ``gemma2``, ``gemma3_text``, ``phi3``, ``olmo2`` and their slimllm
    per-layer variants ``slimllm_<family>``.

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
