"""Resumable prunes: the on-disk state of a block-by-block run (DESIGN.md sections 1 and 4).

:func:`slimllm.pruning.pipeline.prune_model` given a ``state_dir`` records its progress there, and a
later call with the same folder, the same (dense) model, calibration set and settings
continues after the last finished block instead of starting over. The resumed run computes
exactly what the uninterrupted one would have: the inputs of the next block, the pruned blocks
and the dense reference outputs are stored bit for bit, so its tensors are identical (on the
same kind of device and thread count: ``device`` and ``progress`` are the settings a resumed
run may change, and floating-point kernels of another device round differently).

Layout of a state folder::

    state.json                 manifest: format, fingerprint, phase, importances, finished
                               blocks and their report entries
    dense-XXXX.safetensors     block XXXX's outputs in the dense model (pass A, bfloat16, one
                               tensor per chunk): the reference of the report's drift field
    block-XXXX.safetensors     block XXXX after pruning, as the output's shard: its tensors
                               under their checkpoint names (model.layers.XXXX....), in the
                               output dtype, with the zero biases a stock config needs
                               (slimllm.io.streaming; the layout is the manifest's "layout")
    hidden-XXXX.safetensors    inputs of block XXXX, i.e. outputs of the pruned block XXXX-1
                               (only the latest is kept)

Every file is written under a temporary name, flushed to disk and renamed, and ``state.json``
is replaced last, so a process killed at any moment (SIGKILL included) leaves a folder that
describes the last finished block; files of a block that was not committed are ignored and
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from slimllm.errors import CheckpointError, ConfigError

__all__ = ["PruneState", "STATE_NAME", "fingerprint"]

#: manifest file of a state folder
STATE_NAME = "state.json"
_FORMAT = "slimllm-prune-state/2"
#: PruneConfig fields that do not change what is computed (left out of the fingerprint)
_UNFINGERPRINTED = ("progress", "device")
_SAMPLE = 1 << 16


def _tensor_digest(h: Any, tensor: torch.Tensor, sample: bool) -> None:
    t = tensor.detach().reshape(-1)
    if sample and t.numel() > _SAMPLE:
        t = t[:: t.numel() // _SAMPLE][:_SAMPLE]
    t = t.to("cpu").contiguous()
    h.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(model: torch.nn.Module, chunks: Sequence[torch.Tensor], config: dict,
                tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> dict:
    """What a resumed run must share with the interrupted one.

    Args:
        model: the dense model, before any change.
        chunks: the calibration token id chunks (int64 tensors), in order.
        config: ``PruneConfig.to_dict()``.
        tensors: ``(name, tensor)`` pairs to digest instead of ``model.named_parameters()``
            (a lazily loaded model: :meth:`slimllm.io.lazy.LazyCheckpoint.tensors`).

    Returns:
        ``{"config": ..., "calibration": sha256 hex of every chunk's shape and ids,
        "model": sha256 hex of every parameter's name, shape, dtype and a strided sample of
        at most 65,536 of its values, "parameters": total count}`` (JSON-ready).
    """
    calib = hashlib.sha256()
    for chunk in chunks:
        _tensor_digest(calib, chunk.to(torch.int64), sample=False)
    weights = hashlib.sha256()
    count = 0
    for name, param in model.named_parameters() if tensors is None else tensors:
        weights.update(name.encode())
        _tensor_digest(weights, param, sample=True)
        count += param.numel()
    return {
        "config": _settings(config),
        "calibration": calib.hexdigest(),
        "model": weights.hexdigest(),
        "parameters": count,
    }


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _UNFINGERPRINTED}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class PruneState:
    """One state folder (module docstring). Created with :meth:`open`; the pipeline calls
    :meth:`start` after the dense pass, :meth:`commit` after every block, and reads back with
    :meth:`block`, :meth:`hidden`, :meth:`dense`.

    Attributes:
        path: the folder.
        manifest: the parsed ``state.json`` (``{}`` for a new state).
    """

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PruneState":
        """The state in ``path``: the recorded one if ``state.json`` is there, else a new one
        (the folder is created when :meth:`start` runs).

        Raises:
            CheckpointError: ``path`` is a file, a non-empty folder without ``state.json``
                (not a slimllm state: never overwritten), or ``state.json`` is unreadable or of
                another format.
        """
        folder = Path(os.fspath(path)).expanduser()
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"resume state {folder} is not a folder")
        manifest_path = folder / STATE_NAME
        if not manifest_path.is_file():
            if folder.is_dir() and any(folder.iterdir()):
                raise CheckpointError(
                    f"{folder} is not empty and holds no {STATE_NAME}: not a slimllm resume "
                    f"state; refusing to use it"
                )
            return cls(folder, {})
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"resume state {manifest_path} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise CheckpointError(f"resume state {manifest_path} is not a {_FORMAT} manifest")
        return cls(folder, manifest)

    @property
    def resumable(self) -> bool:
        """True when dense references and at least the set-up are on disk (phase "blocks")."""
        return self.manifest.get("phase") == "blocks"

    @property
    def finished(self) -> int:
        """Number of finished blocks (0 when none or not started)."""
        return int(self.manifest.get("finished", 0)) if self.resumable else 0

    @property
    def importance(self) -> list[float]:
        """Per-layer importances s_i of the dense pass (DESIGN.md section 5)."""
        return [float(v) for v in self.manifest["importance"]]

    @property
    def entries(self) -> list[dict]:
        """Report entries of the finished blocks, in order."""
        return list(self.manifest.get("entries", []))

    def check(self, expected: dict) -> None:
        """Raise ConfigError naming what differs between the recorded fingerprint and
        ``expected`` (see :func:`fingerprint`; only the parts ``expected`` has are compared,
        so ``{"config": PruneConfig.to_dict()}`` checks the settings alone, before a model is
        loaded)."""
        recorded = self.manifest.get("fingerprint", {})
        names = {"model": "model weights", "parameters": "parameter count",
                 "calibration": "calibration token ids"}
        diff = [names[k] for k in names if k in expected and recorded.get(k) != expected[k]]
        if "config" in expected:
            old_cfg, new_cfg = recorded.get("config", {}), _settings(expected["config"])
            for key in sorted(set(old_cfg) | set(new_cfg)):
                if old_cfg.get(key) != new_cfg.get(key):
                    diff.append(f"{key} ({old_cfg.get(key)!r} recorded, {new_cfg.get(key)!r} now)")
        if diff:
            raise ConfigError(
                f"cannot resume from {self.path}: the interrupted run differs in "
                f"{', '.join(diff)}; delete the folder to start over"
            )

    # -- writing -----------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        target = self.path / STATE_NAME
        tmp = target.with_name(STATE_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.path)

    def _write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        target = self.path / name
        tmp = target.with_name(name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def _read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / name))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"resume state file {self.path / name} is unreadable: {exc}"
            ) from exc

    def start(
        self,
        expected: dict,
        importance: Sequence[float],
        dense_out: Sequence[Sequence[torch.Tensor]],
        layout: dict | None = None,
    ) -> None:
        """Record a new run: its fingerprint, the dense-pass importances, every block's
        dense outputs (pass A) and the block layout of the output
        (:meth:`slimllm.io.streaming.BlockLayout.to_dict`). Anything in the folder from a run
        that never got this far is replaced.

        Raises:
            CheckpointError: the folder cannot be written (disk full included).
        """
        try:
            if self.path.is_dir():
                for child in self.path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": _FORMAT, "phase": "starting", "fingerprint": expected}
            self._write_manifest()
            for i, outs in enumerate(dense_out):
                self._write_tensors(
                    _name("dense", i), {f"chunk.{c}": t for c, t in enumerate(outs)}
                )
            self.manifest.update(
                phase="blocks", importance=[float(v) for v in importance], finished=0, entries=[],
                layout=layout,
            )
            self._write_manifest()
        except OSError as exc:
            raise CheckpointError(f"cannot write the resume state to {self.path}: {exc}") from exc

    def commit(
        self,
        index: int,
        layer_state: dict[str, torch.Tensor],
        entry: dict,
        next_inputs: Sequence[torch.Tensor] | None,
    ) -> None:
        """Record block ``index`` as finished: its pruned tensors (checkpoint names,
        :meth:`slimllm.io.streaming.BlockLayout.checkpoint_tensors`), its report entry and the
        next block's inputs (None after the last block). Blocks must finish in order.

        Raises:
            CheckpointError: writing failed (disk full included); the previous state stays
                valid.
        """
        if index != self.finished:
            raise CheckpointError(
                f"resume state: block {index} finished after {self.finished} blocks"
            )
        try:
            self._write_tensors(_name("block", index), layer_state)
            if next_inputs is not None:
                self._write_tensors(
                    _name("hidden", index + 1),
                    {f"chunk.{c}": t for c, t in enumerate(next_inputs)},
                )
            self.manifest["entries"] = self.entries + [entry]
            self.manifest["finished"] = index + 1
            self._write_manifest()
            for stale in (_name("hidden", index), _name("dense", index)):
                (self.path / stale).unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot write the resume state to {self.path}: {exc}") from exc

    # -- reading -----------------------------------------------------------------------------

    def block(self, index: int) -> dict[str, torch.Tensor]:
        """The pruned state dict of finished block ``index``."""
        return self._read_tensors(_name("block", index))

    def hidden(self, index: int) -> list[torch.Tensor]:
        """Inputs of block ``index`` (= ``finished``), one tensor per calibration chunk."""
        return _chunks(self._read_tensors(_name("hidden", index)))

    def dense(self, index: int) -> list[torch.Tensor]:
        """Block ``index``'s dense outputs (pass A), bfloat16, one tensor per chunk."""
        return _chunks(self._read_tensors(_name("dense", index)))

    def remove(self) -> None:
        """Delete the folder (after the output has been saved)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _name(kind: str, index: int) -> str:
    return f"{kind}-{index:04d}.safetensors"


def _chunks(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[f"chunk.{c}"] for c in range(len(tensors))]
