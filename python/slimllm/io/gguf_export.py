"""Export of a slimllm-pruned folder (or a plain HF folder) to a GGUF file that stock llama.cpp
loads (``python -m slimllm export DIR --format gguf``).

Architecture written (``general.architecture``), checked against llama.cpp's
``src/models/deci.cpp`` and ``src/models/llama.cpp`` (the sources llama-cpp-python 0.3.36
vendors):

- ``llama``: llama / mistral folders whose layers all have the same shape. llama.cpp builds
  every ``llama`` layer with the layer-0 shapes, so this arch only fits uniform models.
- ``deci`` (Nemotron-NAS): per-layer shapes. Its loader and graph read ``n_head(il)``,
  ``n_head_kv(il)`` and ``n_ff(il)`` per layer (``{arch}.attention.head_count``,
  ``head_count_kv`` and ``feed_forward_length`` written as arrays) with one global head size
  (``{arch}.attention.key_length`` / ``value_length``), the same RMSNorm / SwiGLU / RoPE block
  as Llama. qwen2 folders always go out as ``deci`` too: its graph adds q/k/v biases (optional
  ``attn_q.bias`` etc., ``create_tensor_qkv``) and, unlike llama.cpp's ``qwen2`` arch, an
  ``attn_output.bias``.

Both loaders create the optional ``blk.N.attn_output.bias`` and ``blk.N.ffn_down.bias``
(``TENSOR_NOT_REQUIRED``) and their graphs add them (``build_attn(..., wo_b, ...)``,
``build_ffn(..., ffn_down_b, ...)``), so slimllm's recovery biases are written as they are.
phi3 folders are the same block with fused projections: ``qkv_proj`` and ``gate_up_proj`` are
split by rows into ``attn_q`` / ``attn_k`` / ``attn_v`` and ``ffn_gate`` / ``ffn_up`` (the layer's
own head counts and width), and go out as ``llama`` / ``deci`` like a llama folder. Phi-3's
``sliding_window`` (each token attends to the last ``sliding_window`` positions) has no
counterpart in these archs, so ``{arch}.context_length`` is written as
``min(max_position_embeddings, sliding_window)``: within that context the window never masks
anything and the GGUF computes the same function. Partial rotary embedding
(``partial_rotary_factor`` < 1, Phi-4-mini) and LongRoPE (Phi-3.5, Phi-4-mini) are refused.
granite folders too: its four scalar multipliers are linear and are folded into the embedding,
q_proj, o_proj, down_proj and lm_head weights (``GraniteAdapter.fold_multipliers``).
qwen3 (q/k norms), the Gemmas (``1 + weight`` norms, GeGLU) and olmo2 (q/k norms over the whole
projection, post-norms only) have no exact counterpart in ``deci`` and are refused with
:class:`UnsupportedArchitectureError`; so are non-default RoPE scalings.

Layout: q_proj / k_proj rows (and their biases) are permuted per head for llama.cpp's
"normal" RoPE on consecutive pairs, as ``LlamaModel.permute`` of llama.cpp's
``convert_hf_to_gguf.py`` does (transformers' GGUF loader undoes it). Tensor names come from
``gguf.get_tensor_name_map``. ``f16`` / ``bf16`` / ``q8_0`` convert 2-D weights only (1-D
tensors stay ``f32``), through ``gguf.quants.quantize``, with the converter's fallback to
``f16`` for rows whose length is not a multiple of the Q8_0 block (32).

Tokenizer: when the folder was pruned from a GGUF file (``slimllm_report.json``'s ``model``),
or ``vocab_gguf`` names one, its ``tokenizer.*`` keys are copied unchanged. Otherwise a GPT-2
style byte-level BPE ``tokenizer.json`` is written with ``gguf.vocab.BpeVocab`` and
``gguf.SpecialVocab`` (pre-tokenizer ``default``); other tokenizers raise CheckpointError.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimllm.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from slimllm.io.llama_layout import check_rotary, llama_block_state, unwindowed_context_length

__all__ = [
    "OUTTYPES",
    "EXPORT_FAMILIES",
    "check_exportable",
    "export_gguf",
    "permute_rope_rows",
]

logger = logging.getLogger(__name__)

#: ``--outtype`` -> (gguf.LlamaFileType name, GGMLQuantizationType name of 2-D weights)
OUTTYPES = {
    "f32": ("ALL_F32", "F32"),
    "f16": ("MOSTLY_F16", "F16"),
    "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
}
#: families that can be exported, and the llama.cpp arch used when every layer has one shape
EXPORT_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "deci", "phi3": "llama", "granite": "llama"}
_ROPE_PERMUTED = ("self_attn.q_proj", "self_attn.k_proj")


def permute_rope_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder the rows of q_proj / k_proj (weight ``(heads*head_dim, in)`` or bias
    ``(heads*head_dim,)``, any dtype) from transformers' half-split RoPE layout to llama.cpp's
    interleaved one: within each head, row ``j`` of the first half goes to ``2j`` and row
    ``j`` of the second half to ``2j+1``. The same per-head reshape as ``LlamaModel.permute``
    in llama.cpp's ``convert_hf_to_gguf.py``. Raises ConfigError when the row count is not a
    multiple of ``head_dim`` or ``head_dim`` is odd."""
    if head_dim % 2 or rows.shape[0] % head_dim:
        raise ConfigError(f"{rows.shape[0]} rows do not split into heads of even size {head_dim}")
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedArchitectureError(
            f"RoPE scaling {rope_type!r} is not exported to GGUF (only default RoPE)"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise CheckpointError("config has no rope_theta")
    return float(theta)


def _source_gguf(folder: Path, vocab_gguf: str | os.PathLike | None) -> Path | None:
    """The GGUF file whose tokenizer keys are copied: ``vocab_gguf``, else the ``model`` of the
    folder's report when it is a ``.gguf`` file that exists (absolute, or relative to the
    current folder as ``prune`` was given it)."""
    from slimllm.io.checkpoint import REPORT_NAME, read_json

    if vocab_gguf is not None:
        path = Path(os.fspath(vocab_gguf)).expanduser()
        if not path.is_file():
            raise CheckpointError(f"vocabulary GGUF file {path} does not exist")
        return path
    report_path = folder / REPORT_NAME
    if not report_path.is_file():
        return None
    model = read_json(report_path, "pruning report").get("model")
    if isinstance(model, str) and model.lower().endswith(".gguf"):
        path = Path(model).expanduser()
        if path.is_file():
            return path
        raise CheckpointError(
            f"{folder} was pruned from the GGUF file {model}, which is not there to copy its "
            "tokenizer from; pass its path as vocab_gguf (--vocab-gguf)"
        )
    return None


def _vocab_writer(folder: Path, source: Path | None, n_vocab: int) -> Any:
    """A function adding the tokenizer keys to a GGUFWriter; every file is read here, before
    anything is written."""
    import gguf

    if source is not None:
        try:
            reader = gguf.GGUFReader(str(source))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"GGUF file {source} is unreadable: {exc}") from exc
        fields = []
        for name, field in reader.fields.items():
            if name.startswith("tokenizer."):
                sub = field.types[-1] if len(field.types) > 1 else None
                fields.append((name, field.contents(), field.types[0], sub))
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens.data) != n_vocab:
            raise CheckpointError(
                f"GGUF file {source} has {0 if tokens is None else len(tokens.data)} tokens, the "
                f"model {n_vocab}"
            )

        def add(writer: Any) -> None:
            for name, value, vtype, sub in fields:
                writer.add_key_value(name, value, vtype, sub_type=sub)

        return add
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the tokenizer of {folder} is not a GPT-2 style byte-level BPE tokenizer.json, the "
            f"only HF tokenizer slimllm writes to GGUF ({exc}); pass the source GGUF as vocab_gguf"
        ) from exc
    tokens, _, types = zip(*vocab.all_tokens(), strict=True)
    if len(tokens) > n_vocab:
        raise CheckpointError(f"the tokenizer of {folder} has {len(tokens)} tokens, the model {n_vocab}")
    padding = n_vocab - len(tokens)  # as the converter does: unused rows of the embedding
    tokens = [*tokens, *(f"[PAD{i}]" for i in range(len(tokens), n_vocab))]
    types = [*types, *([gguf.TokenType.UNUSED] * padding)]
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise CheckpointError(f"the tokenizer of {folder} has no BPE merges")

    def add(writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return add


def _convert(name: str, data: np.ndarray, qtype_name: str) -> tuple[np.ndarray, Any]:
    """(array to write, GGMLQuantizationType) of one float32 tensor, as llama.cpp's converter
    does: 1-D tensors stay F32; Q8_0 rows that do not split into blocks fall back to F16."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError as exc:
        logger.info("%s: %s, falling back to F16", name, exc)
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def check_exportable(family: str, config: Any, where: str) -> None:
    """Raise UnsupportedArchitectureError unless a model of ``family`` (an adapter name) with
    ``config`` (its transformers config) can be written as GGUF: a family of
    ``EXPORT_FAMILIES``, default RoPE over whole heads. ``where`` prefixes the message.

    Raises:
        UnsupportedArchitectureError: as above.
        CheckpointError: the config has no ``rope_theta``.
    """
    try:
        _rope_theta(config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{where}: {exc}") from None
    check_rotary(config, where)
    if family not in EXPORT_FAMILIES:
        raise UnsupportedArchitectureError(
            f"{where}: GGUF export supports {', '.join(EXPORT_FAMILIES)}, not {family!r} "
            "(llama.cpp's 'llama' and per-layer 'deci' archs hold the plain Llama block: no q/k "
            "norms, Gemma's 1 + weight norms and GeGLU, or OLMo 2's post-only norm layout)"
        )


def export_gguf(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    outtype: str = "f32",
    vocab_gguf: str | os.PathLike | None = None,
) -> Path:
    """Write the model of ``folder`` (a :func:`~slimllm.io.checkpoint.save_pruned` folder,
    stock or per-layer config, or a plain HF llama / mistral / qwen2 / phi3 / granite folder) as one GGUF file
    that stock llama.cpp loads and runs (module docstring: arch, layout, tokenizer).

    Args:
        folder: the model folder (config.json + safetensors + tokenizer files).
        output: the ``.gguf`` file to create; must not exist. Written to a hidden temporary
            file in the same folder, then renamed: complete or absent.
        outtype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"``: the type of the 2-D weights
            (1-D tensors, norms and biases, stay f32).
        vocab_gguf: a GGUF file whose ``tokenizer.*`` keys are copied (default: the GGUF the
            folder was pruned from, per its report, if any).

    Returns:
        ``Path(output)``, absolute.

    Raises:
        ConfigError: unknown ``outtype``.
        CheckpointError: ``output`` exists or its folder does not; ``folder`` is not a
            loadable causal-LM folder; the tokenizer cannot be written; any write failure.
        UnsupportedArchitectureError: a family other than llama / mistral / qwen2 / phi3 / granite, a
            non-default RoPE scaling, or a partial rotary embedding.
        ShapeMismatchError: a layer whose projections do not fit together.
    """
    import gguf

    from slimllm.families.adapters import get_adapter
    from slimllm.io.checkpoint import _validate_layer, default_mode, load_pruned

    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(os.fspath(output)).expanduser().absolute()
    if out.exists():
        raise CheckpointError(f"output {out} already exists; refusing to overwrite")
    if not out.parent.is_dir():
        raise CheckpointError(f"folder {out.parent} of the output does not exist")
    source = Path(os.fspath(folder)).expanduser()
    model = load_pruned(source, dtype="float32")
    adapter = get_adapter(model)
    config = model.config
    check_exportable(adapter.name, config, str(source))
    layers = adapter.layers(model)
    shapes = [_validate_layer(adapter, i, layer, config.hidden_size) for i, layer in enumerate(layers)]
    head_dim = shapes[0].head_dim
    uniform = all(s == shapes[0] for s in shapes)
    arch = EXPORT_FAMILIES[adapter.name] if uniform else "deci"
    theta = _rope_theta(config)
    n_vocab = int(config.vocab_size)
    add_vocab = _vocab_writer(source, _source_gguf(source, vocab_gguf), n_vocab)
    file_type, qtype_name = OUTTYPES[outtype]

    def per_layer(values: list[int]) -> int | list[int]:
        return values[0] if uniform else values

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(layers))
    state, _ = llama_block_state(model, adapter, shapes)  # a tied lm_head: llama.cpp reuses token_embd
    tensors = []
    for key, value in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedArchitectureError(f"{source}: tensor {key} has no GGUF name in arch {arch!r}")
        data = value.detach().to(torch.float32).cpu().numpy()
        if any(f"{p}." in key for p in _ROPE_PERMUTED):
            data = permute_rope_rows(data, head_dim)
        tensors.append((name, data))
    del state

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.slimllm-tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(source.absolute().name)
        writer.add_context_length(unwindowed_context_length(config))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(len(layers))
        writer.add_feed_forward_length(per_layer([s.intermediate_size for s in shapes]))
        writer.add_head_count(per_layer([s.num_heads for s in shapes]))
        writer.add_head_count_kv(per_layer([s.num_kv_heads for s in shapes]))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(gguf.LlamaFileType[file_type])
        add_vocab(writer)
        for name, data in tensors:
            converted, qtype = _convert(name, data, qtype_name)
            writer.add_tensor(name, converted, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if out.exists():
            raise CheckpointError(f"output {out} appeared while writing; refusing to overwrite")
        default_mode(tmp)  # mkstemp made the file private
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (CheckpointError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"could not write {out}: {exc}") from exc
    logger.info("wrote %s (arch %s, %s, %d tensors)", out, arch, outtype, len(tensors))
    return out
