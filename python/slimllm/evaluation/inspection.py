"""Inspect a saved model folder without loading its weights: per-layer shapes and parameter
counts, the pruning report, and a plot of layer importances and ratios.

Everything here reads only ``config.json``, the safetensors *headers* (tensor names, shapes and
dtypes via ``safetensors.safe_open``; no tensor data) and ``slimllm_report.json``, so it is fast
and light on memory even for large models. It works for a folder written by
:func:`slimllm.io.checkpoint.save_pruned` (stock config or per-layer ``slimllm_<family>`` config)
and for a dense Hugging Face folder alike.

Units: parameter counts are numbers of scalars (tensor elements), sizes are bytes, times are
seconds, ratios are fractions in [0, 1] (printed as percentages). Counts follow
``sum(p.numel() for p in model.parameters())`` of the loaded model: a tied ``lm_head`` shares the
embedding matrix and adds nothing, buffers (rotary ``inv_freq``) are not parameters.

Used by ``python -m slimllm inspect DIR [--plot PATH.png] [--json]``; importable on its own::

    from slimllm.evaluation.inspection import inspect_folder, format_info, plot_info
    info = inspect_folder("out/smollm2-20")
    print(format_info(info))
    plot_info(info, "smollm2-20.png")
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimllm.errors import CheckpointError, ConfigError

__all__ = [
    "LayerInfo",
    "ModelInfo",
    "inspect_folder",
    "summarize_report",
    "format_info",
    "check_plot_path",
    "plot_info",
]

#: ``<prefix>.layers.<i>.<rest>``: a tensor of decoder block i
_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
#: safetensors dtype codes -> torch dtype names
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# ----------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class LayerInfo:
    """Shape and parameter counts of one decoder block, read from the weights.

    Attributes:
        index: block index (0-based).
        num_heads: query heads H.
        num_kv_heads: key/value heads G (divides H).
        head_dim: h, scalars per head.
        intermediate_size: MLP channels F.
        attention_params: scalars in the block's ``self_attn.*`` tensors (q/k/v/o weights and
            biases; Qwen3's ``q_norm``/``k_norm``).
        mlp_params: scalars in the block's ``mlp.*`` tensors (gate/up/down weights and biases).
        norm_params: scalars in the block's other tensors (input / post-attention norms).
        biases: Linear modules that carry a bias (``"q_proj"`` ... ``"down_proj"``; Phi-3:
            ``"qkv_proj"``, ``"gate_up_proj"`` for the fused ones).
        dense_num_heads, dense_num_kv_heads, dense_intermediate_size: the block's shape before
            pruning when the report gives it (``None`` otherwise).
    """

    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_params: int
    mlp_params: int
    norm_params: int
    biases: tuple[str, ...] = ()
    dense_num_heads: int | None = None
    dense_num_kv_heads: int | None = None
    dense_intermediate_size: int | None = None

    @property
    def params(self) -> int:
        """All scalars of the block (attention + MLP + norms)."""
        return self.attention_params + self.mlp_params + self.norm_params

    def projection_weights(self, hidden_size: int, dense: bool = False) -> int | None:
        """Scalars in the seven projection weight matrices (biases excluded) for hidden size d:
        ``(2 H h + 2 G h) d + 3 F d``; with ``dense=True`` for the shape before pruning
        (``None`` when unknown)."""
        if dense:
            if None in (
                self.dense_num_heads,
                self.dense_num_kv_heads,
                self.dense_intermediate_size,
            ):
                return None
            heads, kv, ff = (
                self.dense_num_heads,
                self.dense_num_kv_heads,
                self.dense_intermediate_size,
            )
        else:
            heads, kv, ff = self.num_heads, self.num_kv_heads, self.intermediate_size
        return (2 * heads * self.head_dim + 2 * kv * self.head_dim + 3 * ff) * hidden_size

    def removed_fraction(self, hidden_size: int) -> float | None:
        """Fraction of the block's projection weight scalars removed by pruning (biases not
        counted; 0 for an unpruned block); ``None`` when the dense shape is unknown."""
        dense = self.projection_weights(hidden_size, dense=True)
        if not dense:
            return None
        return 1.0 - self.projection_weights(hidden_size) / dense


@dataclass
class ModelInfo:
    """What :func:`inspect_folder` found in a model folder.

    Attributes:
        path: the folder.
        model_type: ``config.json`` ``model_type`` (``slimllm_<family>`` for per-layer configs).
        family: adapter family (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``granite``,
            ``gemma``, ``gemma2``, ``gemma3_text``, ``phi3``).
        config_format: ``"per-layer"`` (slimllm remote-code config) or ``"stock"``.
        hidden_size: d.
        vocab_size: rows of the embedding matrix.
        layers: one :class:`LayerInfo` per decoder block.
        embedding_params: scalars of the token embedding (vocab x d).
        lm_head_params: scalars of the output projection, 0 when tied to the embedding.
        other_params: scalars of every other non-block tensor (final norm, ...).
        tied_embeddings: lm_head shares the embedding matrix.
        lm_head_stored: the weights hold an ``lm_head.weight`` tensor (a tied one may be
            stored too; it is not counted twice).
        dtypes: torch dtype names of the stored tensors.
        weight_files: file names of the weights (relative to ``path``).
        weight_bytes: total size of the weight files, bytes.
        report: :func:`summarize_report` of ``slimllm_report.json``, or ``None`` when absent.
        warnings: non-fatal problems (unreadable report, report and weights disagreeing).
    """

    path: str
    model_type: str
    family: str
    config_format: str
    hidden_size: int
    vocab_size: int
    layers: list[LayerInfo]
    embedding_params: int
    lm_head_params: int
    other_params: int
    tied_embeddings: bool
    lm_head_stored: bool
    dtypes: list[str]
    weight_files: list[str]
    weight_bytes: int
    report: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(self.layers)

    @property
    def layer_params(self) -> int:
        """Scalars in all decoder blocks."""
        return sum(layer.params for layer in self.layers)

    @property
    def total_params(self) -> int:
        """All parameters of the model, tied weights once (= ``count_parameters`` of the loaded
        model)."""
        return self.layer_params + self.embedding_params + self.lm_head_params + self.other_params

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: every field, per-layer ``params`` and ``removed_fraction``, and the
        totals under ``parameters``."""
        data = asdict(self)
        for entry, layer in zip(data["layers"], self.layers, strict=True):
            entry["biases"] = list(layer.biases)
            entry["params"] = layer.params
            entry["removed_fraction"] = layer.removed_fraction(self.hidden_size)
        data["num_layers"] = self.num_layers
        data["parameters"] = {
            "layers": self.layer_params,
            "attention": sum(layer.attention_params for layer in self.layers),
            "mlp": sum(layer.mlp_params for layer in self.layers),
            "layer_norms": sum(layer.norm_params for layer in self.layers),
            "embeddings": self.embedding_params,
            "lm_head": self.lm_head_params,
            "other": self.other_params,
            "total": self.total_params,
        }
        return data


# ----------------------------------------------------------------------------------------------
# reading a folder


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _read_headers(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Tensor name -> shape, and the dtype names, from the safetensors headers of ``files``."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    if name in shapes:
                        raise CheckpointError(
                            f"tensor {name} is stored twice (again in {path.name})"
                        )
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(int(n) for n in piece.get_shape())
                    code = piece.get_dtype()
                    dtypes.add(_ST_DTYPES.get(code, code.lower()))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"weight file {path} is corrupt: {exc}") from exc
    return shapes, dtypes


def _config_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(
            f"{where}: config.json {key} must be a positive integer, got {value!r}"
        )
    return value


def _config_layer_specs(
    config: dict[str, Any], n_layers: int, per_layer: bool, where: str
) -> list[dict]:
    """The (num_heads, num_kv_heads, head_dim, intermediate_size) config.json gives each block."""
    if per_layer:
        from slimllm.families.modeling_slimllm import LAYERS_KEY

        specs = config.get(LAYERS_KEY)
        if not isinstance(specs, list) or len(specs) != n_layers:
            raise CheckpointError(
                f"{where}: config.json {LAYERS_KEY} must list one entry per layer ({n_layers})"
            )
        out = []
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                raise CheckpointError(f"{where}: config.json {LAYERS_KEY}[{i}] is not an object")
            out.append(
                {
                    key: _config_int(spec, key, f"{where} ({LAYERS_KEY}[{i}])")
                    for key in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size")
                }
                | {"bias": spec.get("bias", [])}
            )
        return out
    heads = _config_int(config, "num_attention_heads", where)
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or _config_int(config, "hidden_size", where) // heads
    spec = {
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim,
        "intermediate_size": _config_int(config, "intermediate_size", where),
        "bias": None,
    }
    return [dict(spec) for _ in range(n_layers)]


def _layer_info(
    index: int, tensors: dict[str, tuple[int, ...]], spec: dict, hidden: int, where: str, family: str
) -> LayerInfo:
    """Shapes of block ``index`` of a model of ``family`` from its tensors (names relative to
    the block; the family's Linear modules, fused ones included), checked against each other
    and against config.json's ``spec``; CheckpointError on any mismatch."""
    from slimllm.families.adapters import get_adapter

    adapter = get_adapter(family)
    needed = [f"{qualified}.weight" for qualified in adapter.linear_modules()]
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise CheckpointError(f"{where}: layer {index} has no {', '.join(missing)} in its weights")
    bad = [name for name in needed if len(tensors[name]) != 2]
    if bad:
        raise CheckpointError(f"{where}: layer {index} {', '.join(bad)} are not matrices")

    h = spec["head_dim"]
    layer_shape = adapter.shape_from_features(
        {name[: -len(".weight")]: tensors[name][::-1] for name in needed}, h
    )
    heads, kv, ff = layer_shape.num_heads, layer_shape.num_kv_heads, layer_shape.intermediate_size
    biases = []
    for qualified, (in_features, out_features) in adapter.linear_features(layer_shape, hidden).items():
        weight_shape = (out_features, in_features)
        if tensors[f"{qualified}.weight"] != weight_shape:
            raise CheckpointError(
                f"{where}: layer {index} {qualified}.weight has shape {tensors[f'{qualified}.weight']}, "
                f"expected {weight_shape} (head_dim {h})"
            )
        bias = tensors.get(f"{qualified}.bias")
        if bias is not None:
            if bias != (out_features,):
                raise CheckpointError(
                    f"{where}: layer {index} {qualified}.bias has shape {bias}, "
                    f"expected ({out_features},)"
                )
            biases.append(qualified.split(".")[1])
    if heads == 0 or kv == 0 or heads % kv:
        raise CheckpointError(f"{where}: layer {index} has {heads} query heads for {kv} KV heads")
    found = (heads, kv, ff)
    wanted = (spec["num_heads"], spec["num_kv_heads"], spec["intermediate_size"])
    if found != wanted:
        raise CheckpointError(
            f"{where}: layer {index}: config.json says {wanted[0]} heads, {wanted[1]} KV heads, "
            f"{wanted[2]} channels but the weights hold {heads}, {kv}, {ff}"
        )
    if spec.get("bias") is not None and sorted(spec["bias"]) != sorted(biases):
        raise CheckpointError(
            f"{where}: layer {index}: config.json lists biases {sorted(spec['bias'])} but the "
            f"weights hold {sorted(biases)}"
        )
    counts = {"self_attn": 0, "mlp": 0, "other": 0}
    for name, shp in tensors.items():
        group = name.split(".", 1)[0]
        counts[group if group in counts else "other"] += _numel(shp)
    return LayerInfo(
        index=index,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=h,
        intermediate_size=ff,
        attention_params=counts["self_attn"],
        mlp_params=counts["mlp"],
        norm_params=counts["other"],
        biases=tuple(biases),
    )


def inspect_folder(path: str | os.PathLike) -> ModelInfo:
    """Read the shapes, parameter counts and report of a model folder (no weights loaded).

    ``path`` is a folder with ``config.json`` and safetensors weights (single file or shards
    with ``model.safetensors.index.json``): a :func:`slimllm.io.checkpoint.save_pruned` output or
    a dense Hugging Face folder. Shapes come from the tensor headers and must agree with
    ``config.json`` (per-layer ``slimllm_layers`` or the stock head / channel counts).
    ``slimllm_report.json`` is optional; an unreadable report or one that disagrees with the
    weights is listed in ``warnings``, not raised.

    Raises:
        CheckpointError: no such folder, no or invalid config.json, missing or corrupt weights
            (truncated header, missing shard), weights that do not match the config, or only
            PyTorch ``.bin`` weights (inspect reads safetensors headers).
        UnsupportedArchitectureError: the config's family has no slimllm adapter.
    """
    from slimllm.io.checkpoint import (
        REPORT_NAME,
        check_architecture,
        check_weights,
        read_json,
        is_pruned_config,
    )

    folder = Path(os.fspath(path)).expanduser()
    where = str(folder)
    if not folder.exists():
        raise CheckpointError(f"no such model folder: {folder}")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a model folder (inspect reads a folder with config.json and "
            "*.safetensors weights)"
        )
    config = read_json(folder / "config.json", "model config")
    family = check_architecture(config, where)
    files = check_weights(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise CheckpointError(
            f"{where} holds PyTorch .bin weights only; inspect reads safetensors headers "
            "(re-save the model with save_pretrained to get safetensors)"
        )
    shapes, dtypes = _read_headers(files)

    hidden = _config_int(config, "hidden_size", where)
    n_layers = _config_int(config, "num_hidden_layers", where)
    per_layer = is_pruned_config(config)
    specs = _config_layer_specs(config, n_layers, per_layer, where)

    block_tensors: dict[int, dict[str, tuple[int, ...]]] = {}
    top: dict[str, tuple[int, ...]] = {}
    for name, shp in shapes.items():
        if name.endswith("inv_freq"):  # rotary buffers in old checkpoints: not parameters
            continue
        match = _LAYER_KEY.match(name)
        if match:
            block_tensors.setdefault(int(match[1]), {})[match[2]] = shp
        else:
            top[name] = shp
    if sorted(block_tensors) != list(range(n_layers)):
        found = sorted(block_tensors)
        raise CheckpointError(
            f"{where}: config.json has {n_layers} layers but the weights hold layers "
            f"{found[:3]}{'...' if len(found) > 3 else ''} ({len(found)} in all)"
        )
    layers = [_layer_info(i, block_tensors[i], specs[i], hidden, where, family) for i in range(n_layers)]

    embed = {k: v for k, v in top.items() if "embed_tokens" in k}
    if len(embed) != 1:
        raise CheckpointError(
            f"{where}: expected one embed_tokens tensor in the weights, found {sorted(embed)}"
        )
    ((embed_name, embed_shape),) = embed.items()
    if len(embed_shape) != 2 or embed_shape[1] != hidden:
        raise CheckpointError(
            f"{where}: {embed_name} has shape {embed_shape}, expected (vocab, {hidden})"
        )
    lm_head = {k: v for k, v in top.items() if k.split(".", 1)[0] == "lm_head"}
    lm_head_stored = bool(lm_head)
    config_tied = config.get("tie_word_embeddings")
    if not lm_head_stored:
        if config_tied is False:
            raise CheckpointError(
                f"{where}: config.json sets tie_word_embeddings false but the weights have "
                "no lm_head"
            )
        tied = True
    else:
        tied = bool(config_tied)
        if lm_head.get("lm_head.weight") != embed_shape:
            raise CheckpointError(
                f"{where}: lm_head.weight has shape {lm_head.get('lm_head.weight')}, "
                f"expected {embed_shape}"
            )
    lm_head_params = 0 if tied else sum(_numel(s) for s in lm_head.values())
    other = {k: v for k, v in top.items() if k not in embed and k not in lm_head}

    info = ModelInfo(
        path=where,
        model_type=str(config.get("model_type")),
        family=family,
        config_format="per-layer" if per_layer else "stock",
        hidden_size=hidden,
        vocab_size=embed_shape[0],
        layers=layers,
        embedding_params=_numel(embed_shape),
        lm_head_params=lm_head_params,
        other_params=sum(_numel(s) for s in other.values()),
        tied_embeddings=tied,
        lm_head_stored=lm_head_stored,
        dtypes=sorted(dtypes),
        weight_files=[str(f.relative_to(folder)) for f in files],
        weight_bytes=sum(f.stat().st_size for f in files),
    )

    report_path = folder / REPORT_NAME
    if report_path.exists():
        try:
            info.report = summarize_report(read_json(report_path, "report"))
        except CheckpointError as exc:
            info.warnings.append(f"{REPORT_NAME} ignored: {exc}")
        if info.report is not None:
            _attach_dense_shapes(info)
    return info


def _attach_dense_shapes(info: ModelInfo) -> None:
    """Copy the report's per-layer dense shapes into ``info.layers``; warn where the report's
    kept counts differ from the weights."""
    entries = {
        e["index"]: e for e in info.report.get("layers") or [] if isinstance(e.get("index"), int)
    }
    if entries and len(entries) != info.num_layers:
        info.warnings.append(
            f"the report describes {len(entries)} layers, the weights hold {info.num_layers}"
        )
    layers = []
    for layer in info.layers:
        entry = entries.get(layer.index)
        if entry is None:
            layers.append(layer)
            continue
        dense = {}
        for key, kept in (
            ("heads", layer.num_heads),
            ("kv_heads", layer.num_kv_heads),
            ("channels", layer.intermediate_size),
        ):
            pair = entry.get(key)
            if pair is None:
                continue
            dense[key] = pair[0]
            if pair[1] != kept:
                info.warnings.append(
                    f"layer {layer.index}: the report keeps {pair[1]} {key.replace('_', ' ')}, "
                    f"the weights hold {kept}"
                )
        layers.append(
            LayerInfo(
                **{
                    **asdict(layer),
                    "biases": layer.biases,
                    "dense_num_heads": dense.get("heads"),
                    "dense_num_kv_heads": dense.get("kv_heads"),
                    "dense_intermediate_size": dense.get("channels"),
                }
            )
        )
    info.layers = layers


# ----------------------------------------------------------------------------------------------
# the report


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _pair(value: Any) -> list[int] | None:
    """``[before, after]`` counts from the report (ints), or None."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return [int(value[0]), int(value[1])]
    return None


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``slimllm_report.json`` that ``inspect`` shows, tolerant of absent or
    malformed keys (each is ``None`` / empty then).

    Returns a dict with: ``method``, ``model`` (source), ``dtype``, ``architecture``;
    ``target_ratio`` and ``achieved_ratio`` (fractions of all parameters), ``base_ratio`` (R);
    ``parameters`` (``before``, ``after``, ``removed``, ``counted_after``: scalar counts);
    ``settings`` (the prune options, ``PruneConfig.to_dict()``); ``calibration`` (the
    calibration description dict); ``layers``: per layer ``index``, ``importance`` (dense
    mean cos(h_in, h_out)), ``ratio`` (allocated r_i), ``clamped``, ``heads`` / ``kv_heads`` /
    ``channels`` ([before, after]), ``layer_cosine`` (pruned block's mean cos(h_in, h_out)),
    ``cos_vs_dense_output`` (pruned vs dense block output), ``head_objective_initial``,
    ``head_objective``, ``head_swaps``; ``timings`` (stage -> seconds).
    """
    if not isinstance(report, dict):
        return {}
    params = report.get("parameters") if isinstance(report.get("parameters"), dict) else {}
    settings = report.get("config") if isinstance(report.get("config"), dict) else {}
    target = _number(params.get("target_ratio"))
    if target is None:
        target = _number(settings.get("ratio"))
    layers = []
    for entry in report.get("layers") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("index"), int):
            continue
        clamped = entry.get("clamped")
        layers.append(
            {
                "index": entry["index"],
                "importance": _number(entry.get("importance")),
                "ratio": _number(entry.get("ratio")),
                "clamped": [str(c) for c in clamped] if isinstance(clamped, list) else [],
                "heads": _pair(entry.get("num_heads")),
                "kv_heads": _pair(entry.get("num_kv_heads")),
                "channels": _pair(entry.get("intermediate_size")),
                "layer_cosine": _number(entry.get("layer_cosine")),
                "cos_vs_dense_output": _number(entry.get("cos_vs_dense_output")),
                "head_objective_initial": _number(entry.get("head_objective_initial")),
                "head_objective": _number(entry.get("head_objective")),
                "head_swaps": _number(entry.get("head_swaps")),
            }
        )
    timings = report.get("timings") if isinstance(report.get("timings"), dict) else {}
    calibration = report.get("calibration")
    return {
        "method": report.get("method"),
        "model": report.get("model"),
        "dtype": report.get("dtype"),
        "architecture": report.get("architecture"),
        "target_ratio": target,
        "achieved_ratio": _number(params.get("achieved_ratio")),
        "base_ratio": _number(report.get("base_ratio")),
        "parameters": {
            key: params.get(key)
            for key in ("before", "after", "removed", "counted_after")
            if isinstance(params.get(key), int)
        },
        "settings": settings,
        "calibration": calibration if isinstance(calibration, (dict, str)) else None,
        "layers": sorted(layers, key=lambda e: e["index"]),
        "timings": {k: v for k, v in timings.items() if _number(v) is not None},
    }


# ----------------------------------------------------------------------------------------------
# text output


def _table(headers: list[str], rows: list[list[Any]], left: tuple[int, ...] = ()) -> list[str]:
    """Columns right-aligned (those in ``left`` left-aligned), two spaces apart."""
    cells = [[str(c) for c in headers]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _pct(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{100 * value:.{digits}f}%"


def _count(value: int | None) -> str | None:
    return None if value is None else f"{value:,}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _shape_change(before: int | None, after: int) -> str:
    return str(after) if before is None or before == after else f"{before}->{after}"


def _float(value: float | None, digits: int = 4) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, (dict, list)))
    return str(value)


def format_info(info: ModelInfo) -> str:
    """The human-readable tables of ``python -m slimllm inspect``: the model summary, one row per
    layer (shape, parameter counts), the non-layer parameters and totals, then the report
    summary (ratios, settings, calibration, per-layer importance / ratio / cosine, timings)."""
    lines = [
        f"model folder: {info.path}",
        f"  family {info.family} (model_type {info.model_type}, {info.config_format} config), "
        f"{info.num_layers} layers, hidden size {info.hidden_size}, vocab {info.vocab_size:,}",
        f"  weights: {len(info.weight_files)} safetensors file(s), {_bytes(info.weight_bytes)}, "
        f"dtype {'/'.join(info.dtypes) or '?'}",
        "",
        "per-layer shapes and parameters (scalars; 'a->b' = dense->kept):",
    ]
    rows = []
    for layer in info.layers:
        rows.append(
            [
                layer.index,
                _shape_change(layer.dense_num_heads, layer.num_heads),
                _shape_change(layer.dense_num_kv_heads, layer.num_kv_heads),
                layer.head_dim,
                _shape_change(layer.dense_intermediate_size, layer.intermediate_size),
                _count(layer.attention_params),
                _count(layer.mlp_params),
                _count(layer.norm_params),
                _count(layer.params),
                _pct(layer.removed_fraction(info.hidden_size), 1),
                ",".join(b.removesuffix("_proj") for b in layer.biases) or "",
            ]
        )
    lines += _table(
        [
            "layer",
            "heads",
            "kv",
            "head_dim",
            "channels",
            "attention",
            "mlp",
            "norms",
            "total",
            "removed",
            "biases",
        ],
        rows,
        left=(10,),
    )
    if info.tied_embeddings:
        lm_head = "tied to the embeddings" + (" (also stored)" if info.lm_head_stored else "")
    else:
        lm_head = f"untied ({info.vocab_size:,} x {info.hidden_size})"
    lines += [""] + _table(
        ["parameters", "count", "note"],
        [
            ["decoder layers", _count(info.layer_params), f"{info.num_layers} blocks"],
            ["  attention", _count(sum(x.attention_params for x in info.layers)), ""],
            ["  mlp", _count(sum(x.mlp_params for x in info.layers)), ""],
            ["  norms", _count(sum(x.norm_params for x in info.layers)), ""],
            [
                "embeddings",
                _count(info.embedding_params),
                f"{info.vocab_size:,} x {info.hidden_size}",
            ],
            ["lm_head", _count(info.lm_head_params), lm_head],
            ["other", _count(info.other_params), "final norm"],
            ["total", _count(info.total_params), ""],
        ],
        left=(0, 2),
    )
    lines += _format_report(info)
    if info.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in info.warnings]
    return "\n".join(lines)


def _format_report(info: ModelInfo) -> list[str]:
    rep = info.report
    if rep is None:
        return [
            "",
            "no slimllm_report.json (not a slimllm-pruned folder, or the report was removed)",
        ]
    lines = ["", "pruning report (slimllm_report.json):"]
    if rep.get("method"):
        lines.append(f"  method: {rep['method']}")
    if rep.get("model"):
        lines.append(
            f"  source model: {rep['model']}" + (f" ({rep['dtype']})" if rep.get("dtype") else "")
        )
    params = rep.get("parameters", {})
    target = _pct(rep.get("target_ratio")) or "per-layer"
    ratio = f"  target ratio {target}, achieved {_pct(rep.get('achieved_ratio')) or '?'}"
    if "before" in params:
        after = params.get("counted_after", params.get("after"))
        ratio += f" ({_count(params['before'])} -> {_count(after)} parameters)"
    if rep.get("base_ratio") is not None:
        ratio += f", base ratio R {rep['base_ratio']:.4f}"
    lines.append(ratio)
    after = params.get("counted_after", params.get("after"))
    if after is not None and after != info.total_params:
        lines.append(
            f"  note: the weights hold {_count(info.total_params)} parameters, the report counted "
            f"{_count(after)} (a stock config stores zero biases where its layout needs them)"
        )
    settings = rep.get("settings") or {}
    hidden = ("progress", "device", "batch_size")  # how, not what: not shown
    shown = {k: v for k, v in settings.items() if k not in hidden and v is not None}
    if shown:
        lines.append(f"  settings: {_describe(shown)}")
    if rep.get("calibration"):
        lines.append(f"  calibration: {_describe(rep['calibration'])}")
    if rep.get("layers"):
        rows = []
        for e in rep["layers"]:
            rows.append(
                [
                    e["index"],
                    _float(e["importance"]),
                    _pct(e["ratio"], 1),
                    None if e["heads"] is None else _shape_change(*e["heads"]),
                    None if e["kv_heads"] is None else _shape_change(*e["kv_heads"]),
                    None if e["channels"] is None else _shape_change(*e["channels"]),
                    ",".join(e["clamped"]),
                    _float(e["layer_cosine"]),
                    _float(e["cos_vs_dense_output"]),
                ]
            )
        lines += [
            "  per layer (importance: dense mean cos(h_in, h_out); r_i: allocated ratio, before "
            "rounding to whole heads and channels; cos: after pruning):"
        ]
        lines += [
            "  " + line
            for line in _table(
                [
                    "layer",
                    "importance",
                    "r_i",
                    "heads",
                    "kv",
                    "channels",
                    "clamped",
                    "cos(in,out)",
                    "cos vs dense",
                ],
                rows,
            )
        ]
    timings = rep.get("timings") or {}
    if timings:
        order = sorted(timings, key=lambda k: (k == "total", -timings[k]))
        lines.append("  timings (s): " + ", ".join(f"{k} {timings[k]:.2f}" for k in order))
    return lines


# ----------------------------------------------------------------------------------------------
# plot


def check_plot_path(path: str | os.PathLike) -> Path:
    """Validate a ``--plot`` target before any work: a ``.png`` name in an existing folder, and
    matplotlib importable. Returns the path.

    Raises:
        ConfigError: wrong suffix, missing folder, or matplotlib not installed (the message
            names it and the ``plot`` extra).
    """
    target = Path(os.fspath(path)).expanduser()
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--plot {path}: the plot is a PNG; give a file name ending in .png")
    if not target.parent.is_dir():
        raise ConfigError(f"--plot {path}: folder {target.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(the 'plot' extra of slimllm)"
        ) from exc
    return target


def plot_info(info: ModelInfo, path: str | os.PathLike) -> Path:
    """Write a PNG of three panels over the layer index: layer importance (dense mean
    cos(h_in, h_out), and the pruned block's cosine), per-layer pruning ratio (allocated r_i
    and the fraction of projection weights actually removed, in %), and the kept query / KV
    heads and MLP channels (dense counts as outlines when the report gives them).

    Uses matplotlib's Agg canvas directly (no pyplot, the process's backend is untouched).
    Panels without data (no report) say so. The file is written atomically.

    Returns:
        the PNG's path.

    Raises:
        ConfigError: see :func:`check_plot_path`; also an unwritable target.
    """
    target = check_plot_path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    n = info.num_layers
    x = list(range(n))
    rep = info.report or {}
    entries = {e["index"]: e for e in rep.get("layers") or []}

    def series(key: str) -> list[float]:
        return [math.nan if entries.get(i, {}).get(key) is None else entries[i][key] for i in x]

    fig = Figure(figsize=(max(8.0, min(0.35 * n + 3, 20.0)), 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_imp, ax_ratio, ax_shape = fig.subplots(3, 1, sharex=True)
    title = (
        f"{Path(info.path).name}: {info.family}, {info.num_layers} layers, "
        f"{info.total_params:,} parameters"
    )
    if rep.get("achieved_ratio") is not None:
        title += f", {100 * rep['achieved_ratio']:.2f}% removed"
        if rep.get("target_ratio") is not None:
            title += f" (target {100 * rep['target_ratio']:.2f}%)"
    fig.suptitle(title, fontsize=11)

    def no_data(ax, what: str) -> None:
        ax.text(
            0.5,
            0.5,
            f"no {what} (no slimllm_report.json)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )

    importance = series("importance")
    if any(not math.isnan(v) for v in importance):
        ax_imp.plot(
            x, importance, "o-", color="tab:blue", label="importance: dense cos(h_in, h_out)"
        )
        after = series("layer_cosine")
        if any(not math.isnan(v) for v in after):
            ax_imp.plot(
                x, after, "s--", color="tab:orange", ms=4, label="pruned block cos(h_in, h_out)"
            )
        ax_imp.legend(fontsize=8, loc="best")
    else:
        no_data(ax_imp, "layer importances")
    ax_imp.set_ylabel("cosine similarity")
    ax_imp.set_title(
        "layer importance (higher = block changes its input less = pruned more)", fontsize=9
    )
    ax_imp.grid(alpha=0.3)

    ratios = series("ratio")
    removed = [info.layers[i].removed_fraction(info.hidden_size) for i in x]
    removed = [math.nan if v is None else v for v in removed]
    width = 0.4
    if any(not math.isnan(v) for v in ratios) or any(not math.isnan(v) for v in removed):
        ax_ratio.bar(
            [i - width / 2 for i in x],
            [0 if math.isnan(v) else v for v in ratios],
            width,
            color="tab:blue",
            label="allocated ratio r_i",
        )
        ax_ratio.bar(
            [i + width / 2 for i in x],
            [0 if math.isnan(v) else v for v in removed],
            width,
            color="tab:red",
            alpha=0.7,
            label="projection weights removed",
        )
        ax_ratio.legend(fontsize=8, loc="best")
    else:
        no_data(ax_ratio, "pruning ratios")
    ax_ratio.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_ratio.set_ylabel("pruning ratio")
    ax_ratio.set_title("per-layer pruning ratio", fontsize=9)
    ax_ratio.grid(alpha=0.3, axis="y")

    heads = [layer.num_heads for layer in info.layers]
    kv = [layer.num_kv_heads for layer in info.layers]
    channels = [layer.intermediate_size for layer in info.layers]
    ax_shape.bar(
        [i - width / 2 for i in x], heads, width, color="tab:green", label="query heads kept"
    )
    ax_shape.bar([i + width / 2 for i in x], kv, width, color="tab:olive", label="KV heads kept")
    dense_heads = [layer.dense_num_heads for layer in info.layers]
    if any(d is not None for d in dense_heads):
        ax_shape.bar(
            [i - width / 2 for i in x],
            [d or 0 for d in dense_heads],
            width,
            fill=False,
            edgecolor="tab:green",
            linestyle=":",
            label="query heads dense",
        )
    ax_shape.set_ylabel("heads")
    ax_shape.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_shape.set_ylim(0, max([*heads, *(d or 0 for d in dense_heads)]) * 1.6)  # room for the legend
    ax_ch = ax_shape.twinx()
    ax_ch.plot(x, channels, "D-", color="tab:purple", ms=4, label="MLP channels kept")
    dense_ch = [layer.dense_intermediate_size for layer in info.layers]
    if any(d is not None for d in dense_ch):
        ax_ch.plot(
            x,
            [math.nan if d is None else d for d in dense_ch],
            ":",
            color="tab:purple",
            label="MLP channels dense",
        )
    ax_ch.set_ylabel("MLP channels")
    ax_ch.set_ylim(0, max([*channels, *(d or 0 for d in dense_ch)]) * 1.6)
    handles = ax_shape.get_legend_handles_labels()
    more = ax_ch.get_legend_handles_labels()
    ax_shape.legend(
        handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper center", ncol=3
    )
    ax_shape.set_title("kept heads and channels per layer", fontsize=9)
    ax_shape.set_xlabel("layer")
    ax_shape.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(n, 30)))
    ax_shape.set_xlim(-0.6, n - 0.4)

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--plot {path}: cannot write: {exc}") from exc
    return target
