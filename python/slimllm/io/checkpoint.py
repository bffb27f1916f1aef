"""Loading models (HF folder, hub id, ``.gguf``, slimllm-pruned folder) and atomic saving of
pruned models (DESIGN.md sections 1 and 6).

Saved layout (``save_pruned``)::

    output_dir/
        model.safetensors (or model-0000x-of-0000y.safetensors + model.safetensors.index.json)
        config.json  generation_config.json  tokenizer files  slimllm_report.json
        modeling_slimllm.py           (only with per-layer shapes: remote code)

Two config flavours:

- **stock**: every layer has the same shape and the family's stock config class represents the
  weights exactly (checked by building the stock model on the meta device and comparing every
  state-dict key and shape). ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``
  (explicit) and ``intermediate_size`` are the pruned ones. For Llama, recovery biases on
  o_proj / down_proj are kept with ``attention_bias`` / ``mlp_bias`` = True and zero biases
  stored for q/k/v / gate/up (Qwen3 and the Gemmas likewise with ``attention_bias`` for an
  o_proj bias). Loads
  with plain ``AutoModelForCausalLM.from_pretrained(DIR)``.
- **per-layer** (remote code): ``model_type`` ``slimllm_<family>``, ``slimllm_layers`` (one
  shape + bias list per layer), ``auto_map`` to ``modeling_slimllm.py`` copied into the folder
  (see :mod:`slimllm.families.modeling_slimllm`). Used for non-uniform shapes and for families whose stock
  config has no place for the recovery biases (mistral, qwen2 and phi3: no o_proj/down_proj
  bias; qwen3, gemma, gemma2 and gemma3_text: no down_proj bias, their ``attention_bias``
  covers o_proj). Loads with
  :func:`load_pruned` (no remote code needed) or ``AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True)``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimllm.families.adapters import (
    REMOTE_MODEL_TYPE_PREFIX,
    LayerShape,
    get_adapter,
    model_type_of,
    supported_architectures,
)
from slimllm.errors import (
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    SlimLLMError,
    UnsupportedArchitectureError,
)

__all__ = [
    "load_model",
    "load_pruned",
    "save_pruned",
    "resolve_dtype",
    "is_pruned_config",
    "REPORT_NAME",
    "read_json",
    "check_architecture",
    "check_weights",
    "REMOTE_CODE_NAME",
    "remove_interrupted_saves",
    "check_output_folder",
]

logger = logging.getLogger(__name__)

#: name of the report file written next to the weights
REPORT_NAME = "slimllm_report.json"
#: name of the remote-code file copied into per-layer checkpoints
REMOTE_CODE_NAME = "modeling_slimllm.py"
#: shard size of saved weights (the Hugging Face hub's convention)
MAX_SHARD_SIZE = "5GB"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LAYERS_KEY = "slimllm_layers"


def _remote() -> Any:
    """slimllm.families.modeling_slimllm (imported lazily: it imports transformers' model classes)."""
    from slimllm.families import modeling_slimllm

    return modeling_slimllm


# ----------------------------------------------------------------------------------------------
# small helpers


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"`` or a
    floating ``torch.dtype`` -> ``torch.dtype``. Raises ConfigError otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unsupported dtype {dtype!r}; use one of float32, float16, bfloat16")


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} requested but MPS is not available")
    return resolved


def is_pruned_config(config: dict[str, Any] | Any) -> bool:
    """True for a slimllm per-layer config (``model_type`` ``slimllm_<family>``), as a dict
    (config.json) or a config object."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return isinstance(model_type, str) and model_type.startswith(REMOTE_MODEL_TYPE_PREFIX)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file (config.json, index, report); ``what`` names it in errors.
    Raises CheckpointError when missing, unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what} {path} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return data


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The base family of a config.json dict; UnsupportedArchitectureError when there is none."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{where}: config.json has no model_type")
    family = model_type_of(model_type)
    try:
        get_adapter(family)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{where}: {exc}") from None
    if is_pruned_config(config) and family not in _remote().FAMILIES:  # pragma: no cover
        raise UnsupportedArchitectureError(f"{where}: no per-layer model class for {family!r}")
    return family


def check_weights(folder: Path) -> list[Path]:
    """Validate the weight files of a local folder before loading: every safetensors file the
    index names (or ``model.safetensors``) must exist and have a complete, parseable header.
    Returns the weight files. Raises CheckpointError."""
    from safetensors import SafetensorError, safe_open

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"safetensors index {index_path} has no weight_map")
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        legacy = [p for p in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (folder / p).is_file()]
        if legacy:  # old-style PyTorch weights: transformers validates them when loading
            return [folder / p for p in legacy]
        raise CheckpointError(f"no model weights (*.safetensors) in {folder}")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"weight file {path} is corrupt: {exc}") from exc
    return files


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        values = info.get(key) or []
        if values:
            shown = sorted(str(v) for v in values)
            problems.append(f"{key.replace('_', ' ')}: {', '.join(shown[:8])}{' ...' if len(shown) > 8 else ''}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(map(str, info["error_msgs"])))
    if problems:
        raise CheckpointError(f"{where} does not match its config ({'; '.join(problems)})")


def _finish(model: nn.Module, device: torch.device) -> nn.Module:
    model.eval()
    if device.type != "cpu":
        model.to(device)
    return model


def _from_pretrained(cls: Any, source: str, where: str, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(source, output_loading_info=True, **kwargs)`` with every missing,
    unexpected or mismatched weight turned into a CheckpointError."""
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except SlimLLMError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"could not load the model from {where}: {exc}") from exc
    _check_loading_info(info, where)
    return model


def _load_tokenizer(source: str, where: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"could not load the tokenizer of {where}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# loading


def load_model(
    source: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer for pruning (DESIGN.md section 1, "load model").

    ``source`` is one of:

    - a local Hugging Face folder (config.json + safetensors, sharded or not);
    - a folder written by :func:`save_pruned` (stock or per-layer config; the latter is loaded
      through :func:`load_pruned`, no remote code needed);
    - a ``.gguf`` file: loaded with transformers' GGUF loader and dequantised to ``dtype``; the
      tokenizer comes from the same file;
    - a hub id (``org/name``), fetched through the Hugging Face cache (needs network access or
      a populated cache).

    Cheap checks run first, before any weight is read: the file or folder exists, config.json
    parses, the architecture has an adapter, every safetensors header is complete.

    Args:
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a torch dtype; the
            dtype of every floating weight of the returned model.
        device: where the model ends up (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Returns:
        ``(model, tokenizer)``: a ``*ForCausalLM`` in eval mode and its tokenizer.

    Raises:
        CheckpointError: missing/corrupt config, weights (including truncated or garbage
            safetensors), GGUF file or tokenizer; weights that do not match the config.
        UnsupportedArchitectureError: the model family has no slimllm adapter (the message
            names it and lists the supported ones), e.g. a GGUF of another architecture.
        ConfigError: invalid dtype or unavailable device.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    text = os.fspath(source)
    path = Path(text).expanduser()

    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, torch_dtype, torch_device)
    if path.is_dir():
        config = read_json(path / "config.json", "model config")
        check_architecture(config, str(path))
        check_weights(path)
        if is_pruned_config(config):
            model = load_pruned(path, dtype=torch_dtype, device=torch_device)
            # the model's config: AutoTokenizer would otherwise read config.json through
            # AutoConfig, which asks whether to trust the folder's remote code
            return model, _load_tokenizer(str(path), str(path), config=model.config)
        tokenizer = _load_tokenizer(str(path), str(path))
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, str(path), str(path), dtype=torch_dtype)
        return _finish(model, torch_device), tokenizer
    if path.exists():
        raise CheckpointError(f"{path} is neither a model folder nor a .gguf file")
    if path.is_absolute() or text.startswith((".", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(f"no such model folder or file: {path}")
    return _load_hub(text, torch_dtype, torch_device)


def _load_hub(repo_id: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    """Hub id path: fetch config.json first (cheap), check the architecture, then load."""
    from transformers.utils import cached_file

    try:
        config_file = cached_file(repo_id, "config.json")
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub (not a local path; offline or "
            f"unknown repository?): {exc}"
        ) from exc
    if config_file is None:
        raise CheckpointError(f"hub repository {repo_id!r} has no config.json")
    config = read_json(Path(config_file), "model config")
    check_architecture(config, repo_id)
    if is_pruned_config(config):
        model = load_pruned(repo_id, dtype=dtype, device=device)
        return model, _load_tokenizer(repo_id, repo_id, config=model.config)
    tokenizer = _load_tokenizer(repo_id, repo_id)
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, repo_id, repo_id, dtype=dtype)
    return _finish(model, device), tokenizer


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file (None if unreadable)."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        return None if field is None else str(field.contents())
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return None


def _gguf_config_and_tokenizer(path: Path) -> tuple[Any, Any]:
    """Config and tokenizer of a ``.gguf`` file (transformers' GGUF readers), architecture
    checked. Raises CheckpointError / UnsupportedArchitectureError."""
    from transformers import AutoConfig

    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as exc:
        architecture = _gguf_architecture(path)
        if architecture is not None and "not supported" in str(exc):
            raise UnsupportedArchitectureError(
                f"{path}: GGUF architecture {architecture!r} is not supported by slimllm; "
                f"supported: {', '.join(supported_architectures())}"
            ) from exc
        raise CheckpointError(f"GGUF file {path} is corrupt or unreadable: {exc}") from exc
    except (OSError, KeyError, IndexError, TypeError, EOFError) as exc:
        raise CheckpointError(f"GGUF file {path} is corrupt or unreadable: {exc}") from exc
    try:
        get_adapter(config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{path}: {exc}") from None
    return config, _load_tokenizer(folder, str(path), gguf_file=name, config=config)


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    config, tokenizer = _gguf_config_and_tokenizer(path)
    folder, name = str(path.parent), path.name
    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.x can keep GGUF blocks packed; slimllm needs dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    model = _from_pretrained(AutoModelForCausalLM, folder, str(path), gguf_file=name, dtype=dtype, **kwargs)
    _drop_gguf_quantizer(model)
    return _finish(model, device), tokenizer


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A dequantised GGUF model is a plain dense model: forget the GGUF quantizer so that it
    saves like one (transformers refuses to serialise "gguf-quantized" models)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed:  # pragma: no cover - dequantize=True prevents it
        raise CheckpointError(f"GGUF weights were left packed in {packed[:3]}; cannot prune them")
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # pragma: no cover - older transformers
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _pruned_source(path: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """``(source, config.json as a dict, family)`` of a local folder or hub id, checked
    (config parses, family supported, safetensors headers complete for a folder)."""
    folder = Path(os.fspath(path)).expanduser()
    if folder.is_dir():
        source = str(folder)
        config_dict = read_json(folder / "config.json", "model config")
        family = check_architecture(config_dict, source)
        check_weights(folder)
        return source, config_dict, family
    if folder.exists():
        raise CheckpointError(f"{folder} is not a model folder")
    source = os.fspath(path)
    if not _HUB_ID.match(source) or folder.is_absolute():
        raise CheckpointError(f"no such model folder: {folder}")
    from transformers.utils import cached_file

    try:
        config_dict = read_json(Path(cached_file(source, "config.json")), "model config")
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"could not fetch {source!r} from the hub: {exc}") from exc
    return source, config_dict, check_architecture(config_dict, source)


def _per_layer_config_of(source: str, config_dict: dict[str, Any], family: str) -> tuple[Any, Any]:
    """``(config, model class)`` of a per-layer pruned folder, built from this package's
    classes (:mod:`slimllm.families.modeling_slimllm`), never from the folder's remote code."""
    config_cls, model_cls = _remote().FAMILIES[family]
    layers = config_dict.get(_LAYERS_KEY)
    if not isinstance(layers, list) or len(layers) != config_dict.get("num_hidden_layers"):
        raise CheckpointError(
            f"{source}: config.json {_LAYERS_KEY} must list one entry per layer "
            f"({config_dict.get('num_hidden_layers')})"
        )
    try:
        return config_cls.from_pretrained(source), model_cls
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: invalid config.json: {exc}") from exc


def load_pruned(
    path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a folder written by :func:`save_pruned` (DESIGN.md section 6), without remote code.

    A per-layer config (``model_type`` ``slimllm_<family>``) is built with the classes of
    :mod:`slimllm.families.modeling_slimllm` from this package (the same code the folder carries for
    ``trust_remote_code=True``); a stock config is loaded with ``AutoModelForCausalLM``.
    Every weight of the folder must match the model exactly (no missing, unexpected or
    mismatched tensors). Also accepts a hub id. Its tokenizer: :func:`load_tokenizer`.

    Returns:
        the ``*ForCausalLM`` in eval mode, weights in ``dtype`` on ``device``.

    Raises:
        CheckpointError: missing/corrupt config.json or weights, weights that do not match.
        UnsupportedArchitectureError: the folder's family has no adapter.
        ConfigError: invalid dtype or device.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    source, config_dict, family = _pruned_source(path)
    if is_pruned_config(config_dict):
        config, model_cls = _per_layer_config_of(source, config_dict, family)
        model = _from_pretrained(model_cls, source, source, config=config, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(AutoModelForCausalLM, source, source, dtype=torch_dtype)
    return _finish(model, torch_device)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a folder written by :func:`save_pruned` (or any HF model folder / hub
    id), loaded without remote code and without transformers' "run the custom code? [y/N]"
    prompt: ``AutoTokenizer.from_pretrained(path)`` on a per-layer folder would read its
    config through ``AutoConfig``, which asks about the folder's ``auto_map``; here the config
    comes from this package's classes instead.

    Returns:
        the tokenizer (a ``PreTrainedTokenizerBase``).

    Raises:
        CheckpointError: missing/corrupt config.json, weights or tokenizer files.
        UnsupportedArchitectureError: the folder's family has no adapter.
    """
    source, config_dict, family = _pruned_source(path)
    if is_pruned_config(config_dict):
        config, _ = _per_layer_config_of(source, config_dict, family)
        return _load_tokenizer(source, source, config=config)
    return _load_tokenizer(source, source)


# ----------------------------------------------------------------------------------------------
# saving


def _layer_biases(adapter: Any, layer: nn.Module) -> list[str]:
    """The Linear modules of ``layer`` with a bias (``"q_proj"`` ..., Phi-3: ``"qkv_proj"``
    ...), in :meth:`~slimllm.families.adapters.ModelAdapter.linear_modules` order."""
    return [
        qualified.split(".")[1]
        for qualified in adapter.linear_modules()
        if adapter.linear(layer, qualified).bias is not None
    ]


def _validate_layer(adapter: Any, idx: int, layer: nn.Module, hidden: int) -> LayerShape:
    """Raise ShapeMismatchError for a layer whose Linear modules do not fit together."""
    shape = adapter.layer_shape(layer)
    for qualified, (in_features, out_features) in adapter.linear_features(shape, hidden).items():
        linear = adapter.linear(layer, qualified)
        actual = tuple(linear.weight.shape)
        if actual != (out_features, in_features):
            raise ShapeMismatchError(
                f"layer {idx} {qualified}.weight has shape {actual}, expected "
                f"{(out_features, in_features)} for {shape}"
            )
        if linear.bias is not None and tuple(linear.bias.shape) != (out_features,):
            raise ShapeMismatchError(
                f"layer {idx} {qualified}.bias has shape {tuple(linear.bias.shape)}, expected ({out_features},)"
            )
    if shape.num_heads == 0 or shape.num_kv_heads == 0 or shape.intermediate_size == 0:
        raise ShapeMismatchError(f"layer {idx} has no heads or no channels left: {shape}")
    if shape.num_heads % shape.num_kv_heads:
        raise ShapeMismatchError(
            f"layer {idx}: {shape.num_heads} query heads are not a multiple of {shape.num_kv_heads} KV heads"
        )
    return shape


def _base_config_dict(model: nn.Module, family: str) -> dict[str, Any]:
    """The model's config as a dict of the base family (slimllm keys removed)."""
    config = model.config
    data = config.to_dict()
    for key in (
        _LAYERS_KEY,
        "auto_map",
        "architectures",
        "_name_or_path",
        "transformers_version",
        "per_layer_config",
    ):
        data.pop(key, None)
    data["model_type"] = family
    return data


def _stock_candidate(
    model: nn.Module,
    family: str,
    shapes: list[LayerShape],
    biases: list[list[str]],
    key_shapes: dict[str, tuple[int, ...]],
) -> tuple[Any, dict[str, tuple[int, ...]]] | None:
    """``(stock config, zero biases to add)`` when every layer has the same shape and biases
    and the family's stock config reproduces every tensor key and shape of ``key_shapes`` (the
    checkpoint's state-dict names -> shapes) once the returned biases (name -> shape, stored as
    zeros: the stock layout has them, the pruned model does not) are added; None otherwise.
    Only ``model.config`` is read (the layers may be pruned, dense or on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(s != shapes[0] for s in shapes) or any(b != biases[0] for b in biases):
        return None
    shape = shapes[0]
    data = _base_config_dict(model, family)
    data.pop("model_type")
    data.update(
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate_size,
    )
    # families whose config has the flags (llama: both; qwen3: attention_bias) get them set from
    # the biases present; zero biases fill the rest of the stock layout below
    owners = {q.split(".")[1]: q.split(".")[0] for q in get_adapter(family).linear_modules()}
    if "attention_bias" in data:
        data["attention_bias"] = any(owners[n] == "self_attn" for n in biases[0])
    if "mlp_bias" in data:
        data["mlp_bias"] = any(owners[n] == "mlp" for n in biases[0])
    try:
        config = AutoConfig.for_model(family, **data)
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - the stock class rejects the shapes: per-layer path
        logger.info("stock %s config cannot represent the pruned model (%s); saving per-layer", family, exc)
        return None
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    padding = {
        key: shp
        for key, shp in expected.items()
        if key not in key_shapes and key.endswith(".bias") and key[: -len(".bias")] + ".weight" in key_shapes
    }
    actual = {**{k: tuple(v) for k, v in key_shapes.items()}, **padding}
    if actual != expected:
        diff = sorted(set(actual.items()) ^ set(expected.items()))[:4]
        logger.info("stock %s layout differs from the pruned model (%s); saving per-layer", family, diff)
        return None
    config.architectures = [type(reference).__name__]
    return config, padding


def _per_layer_config(
    model: nn.Module, family: str, shapes: list[LayerShape], biases: list[list[str]]
) -> Any:
    """The per-layer (remote-code) config of a pruned ``model`` whose layer i has shape
    ``shapes[i]`` and biases on the projections ``biases[i]`` (module docstring); only
    ``model.config`` is read."""
    config_cls, model_cls = _remote().FAMILIES[family]
    data = _base_config_dict(model, family)
    data.pop("model_type")
    template_head_dim = shapes[0].head_dim
    data["head_dim"] = template_head_dim
    data[_LAYERS_KEY] = [
        {
            "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "intermediate_size": s.intermediate_size,
            "bias": b,
        }
        for s, b in zip(shapes, biases, strict=True)
    ]
    config = config_cls(**data)
    config.auto_map = _remote().auto_map(family)
    config.architectures = [model_cls.__name__]
    return config


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def check_output_folder(output_dir: str | os.PathLike) -> Path:
    """Raise CheckpointError unless ``output_dir`` is absent or an empty folder (slimllm never
    overwrites). Returns it as an absolute path."""
    output = Path(os.fspath(output_dir)).expanduser().absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "is not a folder" if not output.is_dir() else "is a folder that is not empty"
        raise CheckpointError(f"output {output} already exists and {what}; refusing to overwrite")
    return output


def _temporary_prefix(output: Path) -> str:
    return f".{output.name}.slimllm-tmp-"


def remove_interrupted_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders that :func:`save_pruned` calls for ``output_dir`` left
    behind when their process was killed (hidden siblings ``.NAME.slimllm-tmp-*``). Call only
    when no other save to ``output_dir`` is running. Returns the folders removed."""
    output = Path(os.fspath(output_dir)).expanduser().absolute()
    stale = sorted(output.parent.glob(glob_escape(_temporary_prefix(output)) + "*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def default_mode(path: Path) -> None:
    """Give ``path`` (a folder or a file that ``tempfile`` made private) the mode a plain
    mkdir / open would: 0o777 / 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _default_permissions(folder: Path) -> None:
    """:func:`default_mode` for ``folder`` and its files."""
    default_mode(folder)
    for path in folder.iterdir():
        if path.is_file():
            default_mode(path)


def save_pruned(model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike, report: dict) -> Path:
    """Write a pruned model atomically (DESIGN.md section 6).

    Writes safetensors weights (sharded at 5 GB), config.json, generation_config.json, the
    tokenizer files and ``slimllm_report.json`` (``report``, JSON-serialised; numpy/torch values
    converted) into a temporary folder next to ``output_dir``, then renames it to
    ``output_dir``. The config is a stock one when every layer has the same shape and biases
    and the stock class reproduces every tensor (Llama: ``attention_bias``/``mlp_bias`` with
    zero q/k/v, gate/up biases next to the recovery biases); otherwise a per-layer config with
    remote code (module docstring). Weights are saved in the model's dtype; the in-memory model
    is not modified (apart from transformers recording ``config.dtype``/``architectures``).

    Returns:
        ``Path(output_dir)``.

    Raises:
        CheckpointError: ``output_dir`` exists and is not an empty folder (never overwritten);
            any failure while writing (disk full included); the temporary folder is removed
            first, so no partial output is ever left.
        ShapeMismatchError: a layer's Linear modules do not fit together (checked before
            anything is written).
        UnsupportedArchitectureError: the model family has no adapter.
    """
    output = check_output_folder(output_dir)
    adapter = get_adapter(model)
    family = adapter.name
    hidden = model.config.hidden_size
    layers = adapter.layers(model)
    shapes = [_validate_layer(adapter, i, layer, hidden) for i, layer in enumerate(layers)]
    biases = [_layer_biases(adapter, layer) for layer in layers]
    report_text = _report_text(report)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    stock = _stock_candidate(model, family, shapes, biases, {k: tuple(v.shape) for k, v in state.items()})
    if stock is not None:
        config, padding = stock
        for key, shp in padding.items():
            weight = state[key[: -len(".bias")] + ".weight"]
            state[key] = torch.zeros(shp, dtype=weight.dtype, device=weight.device)
    else:
        config = _per_layer_config(model, family, shapes, biases)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def write_weights(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state, max_shard_size=MAX_SHARD_SIZE)

    return write_folder(output, config, dtype, tokenizer, report_text, write_weights)


def _report_text(report: dict | None) -> str:
    try:
        return json.dumps(report if report is not None else {}, indent=2, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the report cannot be written as JSON: {exc}") from exc


def write_folder(
    output: Path, config: Any, dtype: str, tokenizer: Any, report_text: str, write_weights: Any
) -> Path:
    """The one writer of a pruned folder, for :func:`save_pruned` and the streaming save
    (:func:`slimllm.io.streaming.save_pruned_from_state`): in a temporary sibling of
    ``output`` (hidden, ``.NAME.slimllm-tmp-*``), ``write_weights(tmp)`` writes the weights
    and the generation config; then config.json (``config``, with ``dtype`` such as
    ``"float32"``), the remote-code file for a per-layer config, the tokenizer files and
    ``report_text`` as ``slimllm_report.json``; then the folder is renamed to ``output``
    (atomic). Returns ``output``.

    Raises:
        CheckpointError: any failure while writing (disk full included); the temporary folder
            is removed first, so no partial output is ever left.
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(output), dir=output.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot create a folder next to {output}: {exc}") from exc
    try:
        write_weights(tmp)
        # save_pretrained writes the in-memory config; replace it with the one describing the files
        config.dtype = dtype
        (tmp / "config.json").unlink(missing_ok=True)
        config.save_pretrained(tmp)
        if is_pruned_config(config):
            shutil.copyfile(Path(_remote().__file__), tmp / REMOTE_CODE_NAME)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(tmp / REPORT_NAME, "w", encoding="utf-8") as handle:
            handle.write(report_text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _default_permissions(tmp)  # mkdtemp made the folder private, the weights can be too
        os.replace(tmp, output)  # atomic; also replaces an empty output folder
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        reason = "disk full" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else "write failed"
        raise CheckpointError(f"could not save the pruned model to {output} ({reason}): {exc}") from exc
    return output
