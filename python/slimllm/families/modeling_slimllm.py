"""Remote code of slimllm-pruned checkpoints whose layers have different shapes.

slimllm copies this file into every checkpoint it cannot describe with a stock config (per-layer
shapes, or recovery biases the stock family has no place for; DESIGN.md section 6). The folder's
``config.json`` then has ``model_type`` ``slimllm_<family>``, an ``auto_map`` pointing here and a
``slimllm_layers`` list, one entry per decoder layer::

    {"num_heads": 6, "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1200,
     "bias": ["o_proj", "down_proj"]}

``bias`` names the Linear modules (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
Phi-3's fused qkv_proj and gate_up_proj in place of their parts) that carry a bias. Every other config field is the base family's, with the dense template values
(``num_attention_heads`` etc. are those of the model before pruning, so the stock validation
passes); the per-layer entries override them. The model is the base family's ``*ForCausalLM``
whose layers' Linear modules are resized (biases included) right after construction, so the
state-dict keys are the stock ones.

Loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` or, without
remote code, ``slimllm.io.checkpoint.load_pruned(DIR)`` (which imports this module from the package).

Self-contained on purpose: it imports only torch and transformers.
"""

import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

#: config key holding the per-layer shapes
LAYERS_KEY = "slimllm_layers"
#: model_type prefix of slimllm per-layer configs
MODEL_TYPE_PREFIX = "slimllm_"
#: fused Linear modules -> the projections they stack along their rows, in order (Phi-3)
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: attention norms over a projection's whole output (norm -> projection), per base family:
#: their weights have one entry per output row of the projection (OLMo 2)
WIDTH_NORMS = {"olmo2": {"q_norm": "q_proj", "k_norm": "k_proj"}}


class LayerConfig:
    """One decoder layer's view of the model config: the fields in ``overrides`` (Phi-3: this
    layer's ``num_attention_heads`` / ``num_key_value_heads``, which its attention forward
    splits qkv_proj with) are the layer's own; every other attribute is read from and written
    to the model config ``base`` itself, so later changes (``set_attn_implementation``) reach
    the layer."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "overrides", dict(overrides))

    def __getattr__(self, name):
        state = self.__dict__
        if "overrides" not in state:  # being copied or unpickled
            raise AttributeError(name)
        if name in state["overrides"]:
            return state["overrides"][name]
        return getattr(state["base"], name)

    def __setattr__(self, name, value):
        if name in self.overrides:
            self.overrides[name] = value
        else:
            setattr(self.base, name, value)

    def __repr__(self):
        return f"LayerConfig({type(self.base).__name__}, {self.overrides})"


def set_attention_heads(attn, num_heads, num_kv_heads, config_fields=()):
    """Record ``num_heads`` query and ``num_kv_heads`` key/value heads on an attention module
    whose projections were resized: ``num_key_value_groups`` and, where the module has them,
    ``num_heads`` / ``num_attention_heads`` / ``num_key_value_heads``; ``config_fields``
    (config names among ``num_attention_heads`` and ``num_key_value_heads``) are set on a
    :class:`LayerConfig` view that becomes ``attn.config``."""
    values = {"num_heads": num_heads, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads}
    attn.num_key_value_groups = num_heads // num_kv_heads
    for attribute, value in values.items():
        if hasattr(attn, attribute):
            setattr(attn, attribute, value)
    if config_fields:
        config = attn.config
        base = config.base if isinstance(config, LayerConfig) else config
        attn.config = LayerConfig(base, **{name: values[name] for name in config_fields})


def _spec_int(spec, key, layer_idx):
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"slimllm_layers[{layer_idx}].{key} must be a positive integer, got {value!r}")
    return value


def _new_linear(old, in_features, out_features, bias):
    weight = old.weight
    return nn.Linear(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def apply_layer_shapes(model, layers, config_fields=(), width_norms=None):
    """Resize the Linear modules of the attention and MLP of every decoder layer of ``model``
    (a Llama-like ``*ForCausalLM``; fused ones as listed in ``FUSED_PROJECTIONS``) to the
    shapes in ``layers`` (the ``slimllm_layers`` list), creating or dropping biases as listed,
    and update the attention modules' head bookkeeping (:func:`set_attention_heads` with
    ``config_fields``). ``width_norms`` (norm name -> projection name, e.g. OLMo 2's
    ``{"q_norm": "q_proj", "k_norm": "k_proj"}``): attention norms whose weight gets one entry
    per output row of that projection (initialised to ones). New modules keep the old ones'
    dtype and device; their values are whatever ``nn.Linear`` initialises (the checkpoint
    overwrites them)."""
    decoder_layers = model.model.layers
    if layers is None or len(layers) != len(decoder_layers):
        raise ValueError(
            f"config.{LAYERS_KEY} must list {len(decoder_layers)} layers, got "
            f"{None if layers is None else len(layers)}"
        )
    hidden = model.config.hidden_size
    for idx, (layer, spec) in enumerate(zip(decoder_layers, layers, strict=True)):
        attn, mlp = layer.self_attn, layer.mlp
        num_heads = _spec_int(spec, "num_heads", idx)
        num_kv_heads = _spec_int(spec, "num_kv_heads", idx)
        head_dim = _spec_int(spec, "head_dim", idx)
        intermediate = _spec_int(spec, "intermediate_size", idx)
        if head_dim != attn.head_dim:
            raise ValueError(
                f"slimllm_layers[{idx}].head_dim={head_dim} differs from the model's head_dim "
                f"{attn.head_dim} (rotary embeddings are shared by all layers)"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"slimllm_layers[{idx}]: {num_heads} query heads are not a multiple of "
                f"{num_kv_heads} key/value heads"
            )
        linears = [
            (module, name, child)
            for module in (attn, mlp)
            for name, child in module.named_children()
            if isinstance(child, nn.Linear)
        ]
        biased = set(spec.get("bias", ()))
        unknown = biased - {name for _, name, _ in linears}
        if unknown:
            raise ValueError(f"slimllm_layers[{idx}].bias names unknown projections {sorted(unknown)}")
        # (output rows, input features) of each projection
        shapes = {
            "q_proj": (num_heads * head_dim, hidden),
            "k_proj": (num_kv_heads * head_dim, hidden),
            "v_proj": (num_kv_heads * head_dim, hidden),
            "o_proj": (hidden, num_heads * head_dim),
            "gate_proj": (intermediate, hidden),
            "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate),
        }
        for module, name, old in linears:
            parts = FUSED_PROJECTIONS.get(name, (name,))
            rows = sum(shapes[p][0] for p in parts)
            setattr(module, name, _new_linear(old, shapes[parts[0]][1], rows, name in biased))
        for norm_name, projection in (width_norms or {}).items():
            norm = getattr(attn, norm_name)
            norm.weight = nn.Parameter(
                torch.ones(shapes[projection][0], dtype=norm.weight.dtype, device=norm.weight.device)
            )
        set_attention_heads(attn, num_heads, num_kv_heads, config_fields)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate
    return model


class SlimLLMLlamaConfig(LlamaConfig):
    """LlamaConfig plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_llama"


class SlimLLMMistralConfig(MistralConfig):
    """MistralConfig plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_mistral"


class SlimLLMQwen2Config(Qwen2Config):
    """Qwen2Config plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_qwen2"


class SlimLLMQwen3Config(Qwen3Config):
    """Qwen3Config plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_qwen3"


class SlimLLMGraniteConfig(GraniteConfig):
    """GraniteConfig plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_granite"


class SlimLLMGemmaConfig(GemmaConfig):
    """GemmaConfig plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_gemma"


class SlimLLMGemma2Config(Gemma2Config):
    """Gemma2Config plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_gemma2"


class SlimLLMGemma3TextConfig(Gemma3TextConfig):
    """Gemma3TextConfig plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_gemma3_text"


class SlimLLMLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMMistralForCausalLM(MistralForCausalLM):
    """MistralForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMMistralConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMQwen2ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMQwen2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMQwen3ForCausalLM(Qwen3ForCausalLM):
    """Qwen3ForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMQwen3Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMGraniteForCausalLM(GraniteForCausalLM):
    """GraniteForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMGraniteConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMGemmaForCausalLM(GemmaForCausalLM):
    """GemmaForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMGemmaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMGemma2ForCausalLM(Gemma2ForCausalLM):
    """Gemma2ForCausalLM with per-layer head counts, intermediate sizes and biases."""

    config_class = SlimLLMGemma2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMGemma3ForCausalLM(Gemma3ForCausalLM):
    """Gemma3ForCausalLM (text decoder) with per-layer head counts, intermediate sizes and
    biases."""

    config_class = SlimLLMGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None))


class SlimLLMPhi3Config(Phi3Config):
    """Phi3Config plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_phi3"


class SlimLLMPhi3ForCausalLM(Phi3ForCausalLM):
    """Phi3ForCausalLM with per-layer head counts, intermediate sizes and biases; each
    attention module reads its own head counts from a :class:`LayerConfig` view (its forward
    splits qkv_proj with ``config.num_attention_heads`` / ``num_key_value_heads``)."""

    config_class = SlimLLMPhi3Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(
            self, getattr(config, LAYERS_KEY, None), ("num_attention_heads", "num_key_value_heads")
        )


class SlimLLMOlmo2Config(Olmo2Config):
    """Olmo2Config plus ``slimllm_layers`` (per-layer shapes and biases)."""

    model_type = "slimllm_olmo2"


class SlimLLMOlmo2ForCausalLM(Olmo2ForCausalLM):
    """Olmo2ForCausalLM with per-layer head counts, intermediate sizes and biases; q_norm /
    k_norm (over the whole q_proj / k_proj output) sized to each layer's heads."""

    config_class = SlimLLMOlmo2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_shapes(self, getattr(config, LAYERS_KEY, None), width_norms=WIDTH_NORMS["olmo2"])


#: base family -> (config class, model class)
FAMILIES = {
    "llama": (SlimLLMLlamaConfig, SlimLLMLlamaForCausalLM),
    "mistral": (SlimLLMMistralConfig, SlimLLMMistralForCausalLM),
    "qwen2": (SlimLLMQwen2Config, SlimLLMQwen2ForCausalLM),
    "qwen3": (SlimLLMQwen3Config, SlimLLMQwen3ForCausalLM),
    "granite": (SlimLLMGraniteConfig, SlimLLMGraniteForCausalLM),
    "gemma": (SlimLLMGemmaConfig, SlimLLMGemmaForCausalLM),
    "gemma2": (SlimLLMGemma2Config, SlimLLMGemma2ForCausalLM),
    "gemma3_text": (SlimLLMGemma3TextConfig, SlimLLMGemma3ForCausalLM),
    "phi3": (SlimLLMPhi3Config, SlimLLMPhi3ForCausalLM),
    "olmo2": (SlimLLMOlmo2Config, SlimLLMOlmo2ForCausalLM),
}


def auto_map(family):
    """The ``auto_map`` entry of a config.json of the family ``family`` (this file's name)."""
    config_cls, model_cls = FAMILIES[family]
    module = __name__.rsplit(".", 1)[-1]
    return {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }


__all__ = [
    "LAYERS_KEY",
    "MODEL_TYPE_PREFIX",
    "FAMILIES",
    "FUSED_PROJECTIONS",
    "LayerConfig",
    "apply_layer_shapes",
    "set_attention_heads",
    "auto_map",
    *(cls.__name__ for pair in FAMILIES.values() for cls in pair),
]
