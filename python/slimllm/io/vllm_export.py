"""Export of a slimllm-pruned folder to a folder that stock vLLM loads
(``python -m slimllm export DIR --format vllm --output OUT``).

- **Stock config** (every layer the same shape: a uniform prune, ``--layer-ratios`` equal): the
  folder already is a plain Hugging Face checkpoint of its source architecture
  (``LlamaForCausalLM`` ..., zero q/k/v or gate/up biases beside recovery biases under
  ``attention_bias`` / ``mlp_bias``), which vLLM loads with no remote code; it is copied as is.
- **Per-layer config**: written as Nemotron-NAS (``DeciLMForCausalLM``,
  ``vllm/model_executor/models/nemotron_nas.py``), whose ``block_configs`` give every layer its
  own KV-head count (``attention.n_heads_in_group`` = query heads per KV head) and FFN width
  (``ffn.intermediate_size``) but keep ``num_attention_heads`` query heads in every layer. Each
  layer's query heads are therefore padded back to the dense count: every KV group of layer i
  gets ``H / G_i`` query heads, the kept ones first, then heads whose q_proj rows (and q
  biases) and o_proj columns are zero. A zero query scores 0 against every key, its attention
  output is a mean of values, and the zero o_proj columns drop it: the padded model computes
  exactly the pruned model's function, at the cost of the padded q_proj / o_proj weights and
  their attention work (the parameter count is recorded in the folder's report). Recovery
  biases: ``attention_bias`` (o_proj, as vLLM's Llama attention reads it), ``qkv_bias``,
  ``mlp_bias``, with zero biases wherever a layer has none. Phi-3's fused ``qkv_proj`` /
  ``gate_up_proj`` are split into the Llama projections (vLLM re-fuses them on load); Granite's
scalar multipliers are folded into the weights
(``GraniteAdapter.fold_multipliers``).
  transformers has no ``nemotron-nas`` model type, so the folder carries its config class
  (:mod:`slimllm.families.configuration_decilm`) and vLLM needs ``trust_remote_code=True``;
  no modeling code is involved (vLLM's own implementation runs).

Families: llama, mistral, qwen2, phi3, granite (the Llama block); partial rotary embedding is
refused. A
sliding window caps ``max_position_embeddings`` at the window, as for the GGUF export.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from slimllm.errors import ShapeMismatchError, UnsupportedArchitectureError

__all__ = ["VLLM_FAMILIES", "export_vllm"]

logger = logging.getLogger(__name__)

#: families whose per-layer models vLLM's Nemotron-NAS implementation computes exactly
VLLM_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "granite")
#: the config module written next to a Nemotron-NAS export
CONFIG_CODE_NAME = "configuration_decilm.py"
_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
#: config fields carried over from the pruned model's (Llama-style) config
_KEPT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "hidden_act", "rms_norm_eps", "rope_parameters",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
)


def _pad_heads(tensor: torch.Tensor, groups: int, per_group: int, full: int, head_dim: int, dim: int) -> torch.Tensor:
    """``tensor`` with its query-head axis ``dim`` (``groups * per_group`` heads of ``head_dim``
    in KV-group order) padded to ``groups * full`` heads: zeros after each group's heads."""
    shape = list(tensor.shape)
    grouped = tensor.reshape(*shape[:dim], groups, per_group, head_dim, *shape[dim + 1:])
    pad_shape = list(grouped.shape)
    pad_shape[dim + 1] = full - per_group
    padded = torch.cat([grouped, grouped.new_zeros(pad_shape)], dim=dim + 1)
    shape[dim] = groups * full * head_dim
    return padded.reshape(shape)


def export_vllm(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the model of ``folder`` (a :func:`~slimllm.io.checkpoint.save_pruned` folder) as a
    folder vLLM loads (module docstring: stock copy, or Nemotron-NAS with padded query heads).

    Args:
        folder: the pruned folder (config.json + safetensors + tokenizer files).
        output: the folder to create; must be absent or empty. Written in a hidden temporary
            sibling, then renamed: complete or absent.

    Returns:
        ``Path(output)``, absolute.

    Raises:
        CheckpointError: ``output`` exists and is not an empty folder; ``folder`` is not a
            loadable causal-LM folder; any write failure.
        UnsupportedArchitectureError: a family other than llama / mistral / qwen2 / phi3 / granite, or a
            partial rotary embedding.
        ShapeMismatchError: a layer whose KV heads do not divide the dense query-head count or
            that has more query heads than it (vLLM's DeciLM has that many in every layer).
    """
    from slimllm.families.adapters import get_adapter
    from slimllm.io.checkpoint import (
        REPORT_NAME,
        _layer_biases,
        _report_text,
        _validate_layer,
        check_output_folder,
        is_pruned_config,
        load_pruned,
        load_tokenizer,
        read_json,
        write_folder,
    )
    from slimllm.io.llama_layout import check_rotary, llama_block_state, unwindowed_context_length

    out = check_output_folder(output)
    source = Path(os.fspath(folder)).expanduser()
    config_dict = read_json(source / "config.json", "model config")
    report_path = source / REPORT_NAME
    report = read_json(report_path, "pruning report") if report_path.is_file() else {}
    adapter = get_adapter(config_dict)
    if adapter.name not in VLLM_FAMILIES:
        raise UnsupportedArchitectureError(
            f"{source}: the vLLM export supports {', '.join(VLLM_FAMILIES)}, not {adapter.name!r} "
            "(vLLM's Nemotron-NAS model holds the plain Llama block)"
        )
    if not is_pruned_config(config_dict):
        # a stock folder: the config alone decides, the weights are copied without being loaded
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        check_rotary(config, str(source))
        logger.info("%s has a stock config: vLLM loads it as %s; copied as is", source, config_dict.get("architectures"))

        def copy_files(tmp: Path) -> None:  # weights, tokenizer, generation config
            for path in source.iterdir():
                if path.is_file() and path.name not in ("config.json", REPORT_NAME):
                    shutil.copyfile(path, tmp / path.name)

        report = {**report, "vllm_export": {"architecture": config_dict.get("architectures"), "padding_parameters": 0}}
        return write_folder(out, config, str(config.dtype).removeprefix("torch."), None,
                            _report_text(report), copy_files)
    model = load_pruned(source, dtype=config_dict.get("dtype") or "float32")
    config = model.config
    check_rotary(config, str(source))
    tokenizer = load_tokenizer(source)
    layers = adapter.layers(model)
    hidden = int(config.hidden_size)
    shapes = [_validate_layer(adapter, i, layer, hidden) for i, layer in enumerate(layers)]
    full = int(config.num_attention_heads)
    for i, s in enumerate(shapes):
        if full % s.num_kv_heads or s.num_heads > full:
            raise ShapeMismatchError(
                f"layer {i}: {s.num_heads} query heads and {s.num_kv_heads} KV heads do not pad to the "
                f"{full} query heads (a multiple of the KV heads) vLLM's DeciLM has in every layer"
            )
    head_dim = shapes[0].head_dim
    biases = {name for layer in layers for name in _layer_biases(adapter, layer)}
    has_qkv = bool(biases & {"q_proj", "k_proj", "v_proj", "qkv_proj"})
    has_o = "o_proj" in biases
    has_mlp = bool(biases & {"gate_proj", "up_proj", "down_proj", "gate_up_proj"})

    prefix = adapter.layers_prefix(model)
    state, tied = llama_block_state(model, adapter, shapes)  # tied: vLLM ties lm_head to embed_tokens
    dtype = next(model.parameters()).dtype
    padding = 0
    for i, s in enumerate(shapes):
        per, groups = s.num_heads // s.num_kv_heads, s.num_kv_heads
        per_full = full // groups
        p = f"{prefix}.{i}"
        state[f"{p}.self_attn.q_proj.weight"] = _pad_heads(
            state[f"{p}.self_attn.q_proj.weight"], groups, per, per_full, head_dim, 0
        )
        state[f"{p}.self_attn.o_proj.weight"] = _pad_heads(
            state[f"{p}.self_attn.o_proj.weight"], groups, per, per_full, head_dim, 1
        )
        padding += 2 * (full - s.num_heads) * head_dim * hidden
        zero_biases = {}
        if has_qkv:
            zero_biases |= {"self_attn.q_proj": s.attention_width, "self_attn.k_proj": s.kv_width,
                            "self_attn.v_proj": s.kv_width}
        if has_o:
            zero_biases["self_attn.o_proj"] = hidden
        if has_mlp:
            zero_biases |= {"mlp.gate_proj": s.intermediate_size, "mlp.up_proj": s.intermediate_size,
                            "mlp.down_proj": hidden}
        for module, width in zero_biases.items():
            key = f"{p}.{module}.bias"
            if key not in state:
                state[key] = torch.zeros(width, dtype=dtype)
                padding += width
        q_bias = f"{p}.self_attn.q_proj.bias"
        if q_bias in state:
            before = state[q_bias].numel()
            state[q_bias] = _pad_heads(state[q_bias], groups, per, per_full, head_dim, 0)
            padding += state[q_bias].numel() - before

    from slimllm.families.configuration_decilm import DeciLMConfig

    fields = {k: getattr(config, k) for k in _KEPT_FIELDS if hasattr(config, k)}
    fields["tie_word_embeddings"] = tied
    decilm = DeciLMConfig(
        **fields,
        num_attention_heads=full,
        num_key_value_heads=max(s.num_kv_heads for s in shapes),
        head_dim=head_dim,
        intermediate_size=max(s.intermediate_size for s in shapes),
        max_position_embeddings=unwindowed_context_length(config),
        attention_bias=has_o,
        qkv_bias=has_qkv,
        mlp_bias=has_mlp,
        block_configs=[
            {"attention": {"n_heads_in_group": full // s.num_kv_heads}, "ffn": {"intermediate_size": s.intermediate_size}}
            for s in shapes
        ],
    )
    decilm.architectures = ["DeciLMForCausalLM"]
    decilm.auto_map = dict(_AUTO_MAP)
    total = sum(v.numel() for v in state.values())
    logger.info("padded query heads and zero biases add %d parameters (%.2f%% of %d)", padding,
                100 * padding / total, total)
    report = {**report, "vllm_export": {"architecture": ["DeciLMForCausalLM"], "padding_parameters": padding,
                                        "parameters": total}}

    def write_weights(tmp: Path) -> None:
        from huggingface_hub import save_torch_state_dict

        from slimllm.families import configuration_decilm
        from slimllm.io.checkpoint import MAX_SHARD_SIZE

        save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size=MAX_SHARD_SIZE)
        shutil.copyfile(Path(configuration_decilm.__file__), tmp / CONFIG_CODE_NAME)
        generation = source / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / generation.name)

    return write_folder(out, decilm, str(dtype).removeprefix("torch."), tokenizer, _report_text(report), write_weights)
