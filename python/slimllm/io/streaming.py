"""Streaming save of a pruned model (issue 11 item 3; DESIGN.md sections 1 and 6).

A resumable prune (:mod:`slimllm.pruning.resume`) writes every finished block once, at its
commit, as ``block-XXXX.safetensors`` of the state folder, already in the form it takes in the
saved checkpoint: its tensors under their checkpoint names (``model.layers.XXXX.self_attn.q_proj
.weight`` ...), in the output dtype, with the zero biases a stock config needs
(:func:`slimllm.io.checkpoint.save_pruned`'s layout). That is possible because the layout is
decided before the walk, from the plan: every layer's head, KV-head and channel counts and the
biases the recovery adds are known once the per-layer ratios are (:func:`plan_layout`); the
decision is recorded in the state's manifest (``layout``).

:func:`save_pruned_from_state` then writes the output folder from the state without the pruned
blocks in memory: the block files are hard-linked (copied across filesystems) into the
temporary output folder as its shards ``model-0000i-of-0000n.safetensors``, the tensors outside
the blocks (embeddings, final norm, an untied lm_head) are written as the last shard, with
``model.safetensors.index.json`` over all of them, and the folder is finished and renamed by the
same writer as :func:`~slimllm.io.checkpoint.save_pruned`
(:func:`~slimllm.io.checkpoint.write_folder`). The state folder is never modified, so a kill at
any point leaves either the resumable state or the complete output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimllm.errors import CheckpointError
from slimllm.families.adapters import LayerShape, get_adapter, projection_size
from slimllm.io.checkpoint import (
    _per_layer_config,
    _report_text,
    _stock_candidate,
    check_output_folder,
    write_folder,
)

__all__ = ["BlockLayout", "plan_layout", "save_pruned_from_state", "INDEX_NAME"]

#: the safetensors index of a sharded checkpoint (transformers' name)
INDEX_NAME = "model.safetensors.index.json"
#: safetensors metadata transformers expects on PyTorch shards
SHARD_METADATA = {"format": "pt"}


@dataclass
class BlockLayout:
    """How the pruned blocks appear in the saved checkpoint, decided before the walk.

    Attributes:
        prefix: state-dict name of the decoder layer list (``"model.layers"``).
        stock: True when the output gets the family's stock config, False for the per-layer one.
        dtype: dtype name of the saved weights (``"float32"``, ``"bfloat16"``, ``"float16"``).
        shapes: per layer, its pruned :class:`LayerShape`.
        biases: per layer, the Linear modules that carry a bias after pruning (q_proj ... down_proj
            order).
        padding: per layer, the zero biases (name relative to the layer -> shape) the stock
            layout needs and the pruned layer lacks (empty lists for a per-layer config).
    """

    prefix: str
    stock: bool
    dtype: str
    shapes: list[LayerShape]
    biases: list[list[str]]
    padding: list[dict[str, list[int]]]

    def to_dict(self) -> dict:
        """JSON-ready form (the state manifest's ``layout``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BlockLayout":
        """Inverse of :meth:`to_dict`; CheckpointError for a malformed record."""
        try:
            return cls(
                prefix=str(data["prefix"]),
                stock=bool(data["stock"]),
                dtype=str(data["dtype"]),
                shapes=[LayerShape(**s) for s in data["shapes"]],
                biases=[list(b) for b in data["biases"]],
                padding=[{k: list(v) for k, v in p.items()} for p in data["padding"]],
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"resume state: malformed block layout ({exc!r})") from exc

    def checkpoint_tensors(self, index: int, layer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block ``index``'s state dict (names relative to the layer) -> its tensors in the
        checkpoint: names ``{prefix}.{index}.NAME``, dtype :attr:`dtype`, plus the zero
        :attr:`padding` biases (same dtype). Tensors are detached, on CPU."""
        dtype = getattr(torch, self.dtype)
        out = {
            f"{self.prefix}.{index}.{k}": v.detach().to(device="cpu", dtype=dtype)
            for k, v in layer_state.items()
        }
        for k, shape in self.padding[index].items():
            out[f"{self.prefix}.{index}.{k}"] = torch.zeros(shape, dtype=dtype)
        return out

    def layer_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`checkpoint_tensors`: names relative to the layer, padding dropped
        (the in-memory layer gets exactly its pruned state dict back, for resume)."""
        head = f"{self.prefix}.{index}."
        padding = self.padding[index]
        return {k[len(head):]: v for k, v in tensors.items() if k[len(head):] not in padding}


def _planned_key_shapes(adapter: Any, prefix: str, index: int, layer: nn.Module, shape: LayerShape,
                        biases: list[str], hidden: int) -> dict[str, tuple[int, ...]]:
    """The state-dict names -> shapes of dense ``layer`` once pruned to ``shape`` with
    ``biases`` (norms over a projection's whole output, ``adapter.width_norms``, take its
    pruned output count; other norms and tensors keep their shapes; only shapes are read, so
    the layer may be on the meta device)."""
    out = {f"{prefix}.{index}.{k}": tuple(v.shape) for k, v in layer.state_dict().items()}
    names = {id(m): n for n, m in layer.named_modules()}
    for qualified, (in_features, out_features) in adapter.linear_features(shape, hidden).items():
        proj = qualified.split(".")[1]
        key = f"{prefix}.{index}.{names[id(adapter.linear(layer, qualified))]}"
        out[f"{key}.weight"] = (out_features, in_features)
        out.pop(f"{key}.bias", None)
        if proj in biases:
            out[f"{key}.bias"] = (out_features,)
    for norm, proj in adapter.width_norms:
        key = f"{prefix}.{index}.{names[id(getattr(adapter.attention(layer), norm))]}.weight"
        out[key] = (projection_size(shape, hidden, proj)[0],)
    return out


def _planned_shapes(model: nn.Module, adapter: Any, prefix: str, shapes: list[LayerShape],
                    biases: list[list[str]]) -> dict[str, tuple[int, ...]]:
    """Every state-dict name -> shape of ``model`` once its layers are pruned as planned (the
    tensors outside the layers as they are)."""
    hidden = model.config.hidden_size
    key_shapes = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(prefix + ".")
    }
    for i, layer in enumerate(adapter.layers(model)):
        key_shapes.update(_planned_key_shapes(adapter, prefix, i, layer, shapes[i], biases[i], hidden))
    return key_shapes


def plan_layout(model: nn.Module, shapes: list[LayerShape], biases: list[list[str]],
                dtype: torch.dtype | None = None) -> tuple[BlockLayout, Any]:
    """Decide, before any block is pruned, how the pruned model will be saved: the stock config
    when :func:`slimllm.io.checkpoint.save_pruned` would choose it for layers of ``shapes`` with
    ``biases`` (the same test, ``_stock_candidate``, on the planned tensor shapes), else the
    per-layer one.

    Args:
        model: the model being pruned (dense or partly pruned; only the config, the names and
            shapes of its tensors and its dtype are read).
        shapes: per layer, the pruned shape (from the plan: H - heads removed, G - KV heads
            removed, h, F - channels removed).
        biases: per layer, the projections with a bias after pruning (the dense ones plus the
            o_proj / down_proj biases the recovery adds), Linear module names in q_proj ...
            down_proj order (:func:`planned_biases`).
        dtype: dtype of the saved blocks (default: the model's; a block-at-a-time model
            computes in float32 and saves in its source dtype).

    Returns:
        ``(layout, config)``: the :class:`BlockLayout` and the config object config.json gets.
    """
    adapter = get_adapter(model)
    prefix = adapter.layers_prefix(model)
    key_shapes = _planned_shapes(model, adapter, prefix, shapes, biases)
    stock = _stock_candidate(model, adapter.name, shapes, biases, key_shapes)
    padding: list[dict[str, list[int]]] = [{} for _ in shapes]
    if stock is not None:
        config, zeros = stock
        for key, shape in zeros.items():
            index, name = key[len(prefix) + 1:].split(".", 1)
            padding[int(index)][name] = list(shape)
    else:
        config = _per_layer_config(model, adapter.name, shapes, biases)
    dtype = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    layout = BlockLayout(prefix, stock is not None, dtype, list(shapes), [list(b) for b in biases], padding)
    return layout, config


def planned_biases(adapter: Any, spec: Any, o_bias_added: bool, down_bias_added: bool) -> list[str]:
    """The Linear modules of a layer of the family of ``adapter`` with a bias after pruning:
    those holding a projection with a bias in ``spec`` (a
    :class:`slimllm.pruning.ratios.LayerSpec`) plus o_proj / down_proj when the recovery adds
    them, in :meth:`~slimllm.families.adapters.ModelAdapter.linear_modules` order (Phi-3:
    ``qkv_proj`` when q, k or v has one)."""
    added = {"o_proj": o_bias_added, "down_proj": down_bias_added}
    return [
        qualified.split(".")[1]
        for qualified, parts in adapter.linear_modules().items()
        if any(getattr(spec, f"{p.removesuffix('_proj')}_bias") or added.get(p, False) for p in parts)
    ]


def _link(source: Path, target: Path) -> None:
    """Hard link ``source`` to ``target``; a copy where links are impossible (another
    filesystem, no link support)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_pruned_from_state(
    model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike, report: dict, state: Any
) -> Path:
    """Write the pruned model of a finished resumable prune from its state folder (module
    docstring), without reading the pruned blocks from ``model``.

    Args:
        model: the pruned model; only its config, its generation config and its tensors
            outside the decoder layers (embeddings, final norm, lm_head) are read, so the
            layers may have been released.
        tokenizer: saved next to the weights (None: no tokenizer files).
        output_dir: the output folder (absent or empty).
        report: JSON-serialisable pruning report, written as ``slimllm_report.json``.
        state: the :class:`slimllm.pruning.resume.PruneState` of the run, every block finished
            (its manifest has the ``layout`` recorded by the pipeline); not modified.

    Returns:
        ``Path(output_dir)`` (absolute), holding the same tensors, config and files as
        :func:`slimllm.io.checkpoint.save_pruned` of the same pruned model, sharded one block
        per file.

    Raises:
        CheckpointError: ``output_dir`` exists and is not empty; the state is not finished or
            has no layout; a block file is missing, unreadable or does not hold the tensors the
            layout describes (checked before the output folder is created); any failure while
            writing (the temporary folder is removed, no partial output is left).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    output = check_output_folder(output_dir)
    report_text = _report_text(report)
    n_layers = len(get_adapter(model).layers(model))
    if state.finished != n_layers or "layout" not in state.manifest:
        raise CheckpointError(
            f"resume state {state.path} is not a finished streaming prune "
            f"({state.finished} of {n_layers} blocks, layout recorded: {'layout' in state.manifest})"
        )
    layout = BlockLayout.from_dict(state.manifest["layout"])
    decided, config = plan_layout(model, layout.shapes, layout.biases)
    if decided != layout:
        raise CheckpointError(
            f"resume state {state.path}: its recorded block layout does not fit this model"
        )
    dtype = getattr(torch, layout.dtype)
    expected = _planned_shapes(model, get_adapter(model), layout.prefix, layout.shapes, layout.biases)
    for i, padding in enumerate(layout.padding):
        expected.update({f"{layout.prefix}.{i}.{k}": tuple(v) for k, v in padding.items()})

    rest: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    found: dict[str, tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        if key.startswith(layout.prefix + "."):
            continue
        found[key] = tuple(value.shape)
        storage = (value.untyped_storage().data_ptr(), value.storage_offset())
        if storage not in seen:  # a tied lm_head is saved once, as the embedding (transformers too)
            seen.add(storage)
            rest[key] = value.detach().to(device="cpu", dtype=dtype).contiguous()

    n_shards = n_layers + 1
    shard_names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = dict.fromkeys(rest, shard_names[-1])
    total = sum(v.numel() * v.element_size() for v in rest.values())
    blocks = [state.path / f"block-{i:04d}.safetensors" for i in range(n_layers)]
    for i, path in enumerate(blocks):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shape = tuple(handle.get_slice(name).get_shape())
                    found[name] = shape
                    weight_map[name] = shard_names[i]
                    total += math.prod(shape) * dtype.itemsize
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"resume state file {path} is missing or unreadable: {exc}") from exc
    if found != expected:  # the shards must hold exactly what the up-front decision promised
        diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
        raise CheckpointError(
            f"resume state {state.path}: the block files do not hold the planned tensors ({diff})"
        )

    def write_weights(tmp: Path) -> None:
        for i, path in enumerate(blocks):
            _link(path, tmp / shard_names[i])
        save_file(rest, str(tmp / shard_names[-1]), metadata=SHARD_METADATA)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(tmp / INDEX_NAME, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)

    return write_folder(output, config, layout.dtype, tokenizer, report_text, write_weights)
