"""Block-at-a-time model access for pruning models larger than memory (issue 11, DESIGN.md
section 1 "load model").

:func:`open_lazy` builds the model skeleton from the config with every parameter on the meta
device (accelerate's ``init_empty_weights``; buffers such as the rotary ``inv_freq`` are real)
and returns a :class:`LazyCheckpoint` that materialises one decoder block, or the outer
parameters (embeddings, final norm, lm_head), at a time:

- Hugging Face folders (``model.safetensors`` or shards named by
  ``model.safetensors.index.json``): tensors are read with ``safetensors.safe_open``
  (memory-mapped) in the checkpoint's dtype; a shard is opened when a tensor of it is first
  needed, so a truncated shard is found when its block is reached.
- GGUF files: tensors are read with ``gguf.GGUFReader`` (memory-mapped) and dequantised one at
  a time with ``gguf.quants.dequantize`` to float32, then passed through transformers' own
  GGUF name map and tensor processor (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``: the
  llama q/k reverse permutation, the gemma norm offsets), so every tensor equals what
  transformers' whole-model GGUF loader gives.

Memory: the skeleton costs nothing; a materialised block costs its parameters in the dtype
asked for. Folders written by slimllm (per-layer config) and hub ids keep the eager path
(:func:`slimllm.io.checkpoint.load_model`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from slimllm.errors import CheckpointError, ConfigError, SlimLLMError
from slimllm.families.adapters import get_adapter

__all__ = ["LazyCheckpoint", "open_lazy", "return_freed_memory", "supports_lazy"]


def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _glibc()


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS (glibc ``malloc_trim(0)``; nothing
    elsewhere). :meth:`LazyCheckpoint.release_block`, :meth:`LazyCheckpoint.release_outer`
    and the end of :meth:`LazyCheckpoint.tensors` call it, each time weights are let go:
    glibc keeps freed chunks in its arenas, and without this the peak RSS of a SmolLM2 walk
    grew by ~15 MiB a block (410 MiB over 30 blocks) while the bytes in use stayed flat
    (mallinfo2)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def supports_lazy(source: str | os.PathLike) -> bool:
    """True for a ``.gguf`` file or a local folder with safetensors weights and a stock
    (not slimllm per-layer) config: the sources :func:`open_lazy` reads block by block."""
    from slimllm.io.checkpoint import is_pruned_config, read_json

    path = Path(os.fspath(source)).expanduser()
    if path.suffix.lower() == ".gguf":
        return path.is_file()
    if not path.is_dir() or not (path / "config.json").is_file():
        return False
    has_weights = (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file()
    return has_weights and not is_pruned_config(read_json(path / "config.json", "model config"))


class _SafetensorsSource:
    """Tensors of a (sharded) safetensors folder, by state-dict name, in the file's dtype."""

    def __init__(self, folder: Path) -> None:
        from slimllm.io.checkpoint import read_json

        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = read_json(index_path, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"safetensors index {index_path} has no weight_map")
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        else:
            single = folder / "model.safetensors"
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(single), framework="pt") as handle:
                    self.files = {name: single for name in handle.keys()}
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"weight file {single} is corrupt: {exc}") from exc
        for shard in sorted(set(self.files.values())):
            if not shard.is_file():
                raise CheckpointError(f"weight file {shard} named in {index_path} is missing")

    def names(self) -> set[str]:
        return set(self.files)

    def dtype(self, name: str) -> torch.dtype:
        return self.read(name).dtype

    def stored(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.files[name]
        try:  # opened per read: a mapping kept open would keep every page read resident
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"weight file {path} is corrupt (reading {name}): {exc}") from exc


class _GGUFSource:
    """Tensors of a GGUF file, by state-dict name, dequantised to float32 one at a time."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = path
        self._reader = GGUFReader(str(path))
        architecture = str(self._reader.fields["general.architecture"].contents())
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=skeleton.config.to_dict())
        to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {}
        for tensor in self._reader.tensors:
            hf = to_hf.get(tensor.name)
            if hf is not None:
                self._tensors[hf] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def stored(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self._tensors[name].data))

    def read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name} ({name}) has quantisation type "
                f"{tensor.tensor_type.name}, which gguf-py cannot dequantise"
            ) from exc
        weights = self._processor.process(weights=weights, name=tensor.name).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32))


class LazyCheckpoint:
    """A model skeleton (parameters on meta) and the source its tensors are read from.

    Attributes:
        model: the ``*ForCausalLM`` skeleton in eval mode; a parameter is real only while its
            block (or the outer parameters) is materialised.
        source_dtype: dtype of the checkpoint's floating weights (float32 for GGUF).
        dtype: dtype of the weights kept in memory between uses and of the saved model
            (``--dtype``, default ``source_dtype``).
        compute_dtype: dtype a block is computed in while it is pruned (float32 on CPU).
    """

    def __init__(self, model: nn.Module, source: Any, where: str, dtype: torch.dtype | None,
                 compute_dtype: torch.dtype) -> None:
        self.model = model
        self._source = source
        self.where = where
        self.adapter = get_adapter(model)
        prefix = self.adapter.layers_prefix(model)
        self._prefixes = [f"{prefix}.{i}." for i in range(len(self.adapter.layers(model)))]
        wanted = {n for n, _ in model.named_parameters()}
        missing = sorted(wanted - source.names())
        if missing:
            raise CheckpointError(
                f"{where} lacks tensors of the model: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}"
            )
        first = next(n for n in sorted(wanted) if n.startswith(self._prefixes[0]))
        self.source_dtype = source.dtype(first)
        self.dtype = self.source_dtype if dtype is None else dtype
        self.compute_dtype = compute_dtype

    def _names(self, index: int | None) -> list[str]:
        """Parameter names of block ``index`` (None: the outer ones)."""
        out = []
        for name, _ in self.model.named_parameters():
            inside = [i for i, p in enumerate(self._prefixes) if name.startswith(p)]
            if (index is None and not inside) or (index is not None and inside == [index]):
                out.append(name)
        return out

    def _set(self, names: list[str], device: torch.device | str, dtype: torch.dtype | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            value = None if dtype is None else self._source.read(name).to(device=device, dtype=dtype)
            set_module_tensor_to_device(self.model, name, "meta" if dtype is None else device,
                                        value=value, dtype=dtype)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter of the dense model as stored, read one at a time (safetensors: the
        tensor in its dtype; GGUF: its quantised bytes, not dequantised) for the resume
        fingerprint (:func:`slimllm.pruning.resume.fingerprint`); once all are read, the heap
        they were read into is returned to the OS (:func:`return_freed_memory`)."""
        for name, _ in self.model.named_parameters():
            yield name, self._source.stored(name)
        return_freed_memory()

    def load_block(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Materialise decoder block ``index`` on ``device`` in ``compute_dtype`` (weights
        read from the source, cast from the source dtype). Returns the block.
        Raises CheckpointError when its weight file is corrupt or truncated."""
        self._set(self._names(index), device, self.compute_dtype)
        return self.adapter.layers(self.model)[index]

    def release_block(self, index: int) -> None:
        """Put block ``index`` (dense, or pruned and saved) back on the meta device, freeing its
        weights, and return the freed heap to the OS (:func:`return_freed_memory`)."""
        self._set(self._names(index), "meta", None)
        return_freed_memory()

    def keep_block(self, index: int) -> None:
        """A pruned block is kept in memory: moved to the CPU in ``dtype`` (its shapes are the
        pruned ones, so it is never re-read from the source)."""
        self.adapter.layers(self.model)[index].to(device="cpu", dtype=self.dtype)

    def load_outer(self, dtype: torch.dtype | None = None) -> None:
        """Materialise the parameters outside the decoder blocks (embeddings, final norm,
        lm_head) on the CPU in ``dtype`` (default ``compute_dtype``), tied weights re-tied."""
        self._set(self._names(None), "cpu", self.compute_dtype if dtype is None else dtype)
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.model.tie_weights()

    def release_outer(self) -> None:
        """Put the outer parameters back on the meta device and return the freed heap to the
        OS (:func:`return_freed_memory`)."""
        self._set(self._names(None), "meta", None)
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.model.tie_weights()
        return_freed_memory()


def open_lazy(
    source: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> tuple[LazyCheckpoint, Any]:
    """Open a HF safetensors folder or a ``.gguf`` file for block-at-a-time access.

    Reads the config and tokenizer (transformers; for GGUF from the same file), checks the
    architecture and that every shard named by the index exists, and builds the skeleton.
    No weight is read.

    Args:
        dtype: weights kept in memory and saved; None (default) keeps the source dtype
            (bf16/fp16/fp32 of the safetensors, float32 for GGUF).
        compute_dtype: dtype of the block being pruned; float32 on CPU (the only one
            allowed there), the source dtype is allowed on a GPU.
        device: the compute device (only used to validate ``compute_dtype``).

    Returns:
        ``(LazyCheckpoint, tokenizer)``.

    Raises:
        CheckpointError: missing/corrupt config, index, a shard named in the index missing,
            tensors of the model absent from the checkpoint, GGUF unreadable.
        UnsupportedArchitectureError: no slimllm adapter for the family.
        ConfigError: invalid dtype, or a compute dtype other than float32 on CPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimllm.io.checkpoint import (
        _gguf_config_and_tokenizer,
        _load_tokenizer,
        check_architecture,
        read_json,
        resolve_dtype,
    )

    torch_dtype = None if dtype is None else resolve_dtype(dtype)
    compute = resolve_dtype(compute_dtype)
    if torch.device(device).type == "cpu" and compute != torch.float32:
        raise ConfigError(f"compute dtype {compute} is only allowed on a GPU; use float32 on CPU")
    path = Path(os.fspath(source)).expanduser()
    if path.suffix.lower() == ".gguf":
        config, tokenizer = _gguf_config_and_tokenizer(path)
    else:
        check_architecture(read_json(path / "config.json", "model config"), str(path))
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: invalid config.json: {exc}") from exc
        tokenizer = _load_tokenizer(str(path), str(path))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    model.eval()
    try:
        store = _GGUFSource(path, model) if path.suffix.lower() == ".gguf" else _SafetensorsSource(path)
    except SlimLLMError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is corrupt or unreadable: {exc}") from exc
    return LazyCheckpoint(model, store, str(path), torch_dtype, compute), tokenizer
