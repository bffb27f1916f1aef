"""Calibration spread over several processes (``torchrun``, issue 11 item 5).

Under ``torchrun --nproc-per-node N -m slimllm prune ...`` every rank loads the model and the
same calibration sequences, runs a contiguous share of the calibration chunks through each
block, and the statistics the core accumulates are combined before any score, selection or
regression: sums of floats (cosine sums, token counts, sums of squares) are all-reduced in
float64; ``Moments`` / ``PairedMoments`` are all-gathered as their exact shifted parts and
merged in rank order (the core's ``merge``, DESIGN.md section 2), so every rank takes the same
decisions and the result equals the single-process run up to float64 rounding. Rank 0 alone
writes the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from slimllm import _core
from slimllm.errors import DistributedError

__all__ = ["Distributed", "from_environment"]


@dataclass(frozen=True)
class Distributed:
    """Rank and world size of an initialised ``torch.distributed`` process group (gloo)."""

    rank: int
    world_size: int

    def share(self, n_chunks: int) -> range:
        """The contiguous chunk indices of this rank: [r*n//N, (r+1)*n//N). Raises
        DistributedError with fewer chunks than ranks."""
        if n_chunks < self.world_size:
            raise DistributedError(
                f"{n_chunks} calibration chunks for {self.world_size} processes: every process "
                "needs at least one (give more sequences or a smaller --batch-size)"
            )
        return range(self.rank * n_chunks // self.world_size,
                     (self.rank + 1) * n_chunks // self.world_size)

    def sum(self, *values: float) -> tuple[float, ...]:
        """The float64 sums over ranks of ``values`` (all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return tuple(float(v) for v in t)

    def _gather(self, array: np.ndarray) -> list[np.ndarray]:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t)
        return [o.numpy() for o in out]

    def combine(self, acc):
        """``acc`` (``_core.Moments``, ``SquareSums`` or ``PairedMoments``) over every rank's
        rows: the same new accumulator on every rank."""
        if isinstance(acc, _core.SquareSums):
            count, sq = self.sum(acc.count)[0], acc.sum_squares
            t = torch.from_numpy(sq.copy())
            torch.distributed.all_reduce(t)
            return _core.SquareSums.from_parts(int(count), t.numpy())
        if isinstance(acc, _core.Moments):
            n, s, c, cs, cg = acc.parts()
            flat = np.concatenate([[float(n)], s, c, cs, cg.ravel()])
            d = acc.dim
            merged = _core.Moments(d)
            # views of the contiguous gathered buffer: the binding copies them into the new
            # accumulator (it needs C-contiguous 2-D arrays, which the reshape is)
            for g in self._gather(flat):
                merged.merge(_core.Moments.from_parts(
                    int(g[0]), g[1:1 + d], g[1 + d:1 + 2 * d], g[1 + 2 * d:1 + 3 * d],
                    g[1 + 3 * d:].reshape(d, d)))
            return merged
        if isinstance(acc, _core.PairedMoments):
            n, parts = acc.parts()
            flat = np.concatenate([[float(n)], parts.ravel()])
            merged = _core.PairedMoments(acc.dim)
            for g in self._gather(flat):
                merged.merge(_core.PairedMoments.from_parts(int(g[0]), g[1:].reshape(parts.shape)))
            return merged
        raise TypeError(f"cannot combine a {type(acc).__name__}")

    def same_tokens(self, ids: torch.Tensor) -> None:
        """Raise DistributedError unless every rank has rank 0's calibration token ids."""
        ref = ids.clone()
        torch.distributed.broadcast(ref, 0)
        same = torch.tensor([float(torch.equal(ref, ids))], dtype=torch.float64)
        torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
        if same.item() != 1.0:
            raise DistributedError("the calibration sequences differ between processes")

    def barrier(self) -> None:
        torch.distributed.barrier()


def from_environment(device: str) -> Distributed | None:
    """A :class:`Distributed` when launched by torchrun with WORLD_SIZE > 1 (the gloo process
    group is initialised), else None. ``device``: the compute device (unused by gloo)."""
    if not torch.distributed.is_torchelastic_launched() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not torch.distributed.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        # the statistics are exchanged as float64 CPU arrays, so gloo serves cuda runs too
        torch.distributed.init_process_group("gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
