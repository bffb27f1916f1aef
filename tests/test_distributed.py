"""torchrun scale-out of the calibration (issue 11 item 5): 2 gloo processes on CPU give the
single-process result (same kept heads and channels, weights within 1e-6 relative), rank 0
alone writes; exact round trips of the statistics' parts; the refused combinations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from saved import folder_tensors

from slimllm import _core

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, processes: int = 1, batch_size: int = 2):
    """The installed package's CLI (the tests' interpreter), optionally under torchrun."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*launch, "-m", "slimllm", "prune", *map(str, args), "--num-samples", "16",
           "--seq-len", "24", "--batch-size", str(batch_size), "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)


@pytest.fixture(scope="module")
def dense(make_tiny_model, tiny_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist") / "dense"
    make_tiny_model("llama", layers=3).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    calib = folder.parent / "calib.txt"
    calib.write_text("Each rank runs its share of the calibration sequences. " * 120, encoding="utf-8")
    return folder, calib


def test_parts_round_trip_merges_like_the_originals():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)) + 3.0, rng.normal(size=(30, 6)) - 1.0
    a, b = _core.Moments(6), _core.Moments(6)
    a.update(x), b.update(y)
    ra, rb = _core.Moments.from_parts(*a.parts()), _core.Moments.from_parts(*b.parts())
    a.merge(b), ra.merge(rb)
    assert np.array_equal(ra.covariance(), a.covariance())
    assert np.array_equal(ra.mean(), a.mean()) and ra.count == a.count == 80
    # independent check: the merged covariance is numpy's population covariance of both
    np.testing.assert_allclose(a.covariance(), np.cov(np.vstack([x, y]).T, bias=True), rtol=1e-12)
    q = _core.SquareSums(6)
    q.update(x)
    back = _core.SquareSums.from_parts(q.count, q.sum_squares)
    assert np.array_equal(back.norms(), np.sqrt((x * x).sum(0)))
    p, p2 = _core.PairedMoments(6), _core.PairedMoments(6)
    p.update(x, 2 * x + 1), p2.update(y, y)
    rp = _core.PairedMoments.from_parts(*p.parts())
    rp.merge(_core.PairedMoments.from_parts(*p2.parts()))
    p.merge(p2)
    assert [np.array_equal(u, v) for u, v in zip(rp.parts()[1], p.parts()[1])] == [True] * 11
    with pytest.raises(_core.ShapeMismatchError):
        _core.Moments.from_parts(1, np.zeros(3), np.zeros(3), np.zeros(2), np.zeros((3, 3)))
    with pytest.raises(_core.ShapeMismatchError):
        _core.PairedMoments.from_parts(1, np.zeros((10, 3)))



def test_combine_rebuilds_from_views_of_the_gathered_buffer(tmp_path):
    """Distributed.combine in a one-process gloo group: the accumulators rebuilt from views of
    the gathered float64 buffer (no copies) equal the originals exactly and do not alias it;
    the binding refuses a non-C-contiguous 2-D part with TypeError, which the views are not."""
    from slimllm.pruning.distributed import Distributed

    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)) + 2.0
    m, p, q = _core.Moments(5), _core.PairedMoments(5), _core.SquareSums(5)
    m.update(x), p.update(x, 3 * x - 1), q.update(x)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                         rank=0, world_size=1)
    try:
        dist = Distributed(0, 1)
        cm, cp, cq = dist.combine(m), dist.combine(p), dist.combine(q)
    finally:
        torch.distributed.destroy_process_group()
    assert cm.count == 40 and np.array_equal(cm.covariance(), m.covariance())
    assert np.array_equal(cm.mean(), m.mean())
    assert [np.array_equal(u, v) for u, v in zip(cp.parts()[1], p.parts()[1])] == [True] * 11
    assert np.array_equal(cq.norms(), np.sqrt((x * x).sum(0)))
    n, s, c, cs, cg = m.parts()
    flat = np.concatenate([[float(n)], s, c, cs, cg.ravel()])
    views = (flat[1:6], flat[6:11], flat[11:16], flat[16:].reshape(5, 5))
    rebuilt = _core.Moments.from_parts(int(flat[0]), *views)
    flat[1:] = 0.0
    assert np.array_equal(rebuilt.covariance(), m.covariance())
    with pytest.raises(TypeError, match="C-contiguous"):
        _core.Moments.from_parts(int(n), s, c, cs, np.asfortranarray(cg))


class _OneRank:
    """A stand-in for a Distributed of one process reporting ``rank``: the whole calibration
    set, sums and statistics as they are (what a world of one combines to)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.world_size = rank, 1

    def share(self, n_chunks: int) -> range:
        return range(n_chunks)

    def sum(self, *values: float) -> tuple[float, ...]:
        return values

    def combine(self, acc):
        return acc


def test_ranks_other_than_0_drop_finished_lazy_blocks(dense):
    """Without a state (ranks other than 0 save nothing), a lazy prune on rank 1 puts every
    pruned block back on meta with its pruned shapes, as rank 0 does after committing it,
    while rank 0 keeps them on the CPU; both take the same decisions."""
    from slimllm.io.lazy import open_lazy
    from slimllm.pruning.pipeline import PruneConfig, prune_model

    folder, _ = dense
    config = PruneConfig(progress=False, batch_size=4, ratio=0.3)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for rank in (0, 1):
        lazy, _ = open_lazy(folder)
        runs[rank] = prune_model(lazy.model, None, ids, config, lazy=lazy, dist=_OneRank(rank))
    (m0, r0), (m1, r1) = runs[0], runs[1]
    assert r0["layers"] == r1["layers"] and r0["parameters"] == r1["parameters"]
    for b0, b1, entry in zip(m0.model.layers, m1.model.layers, r1["layers"], strict=True):
        assert not any(p.is_meta for p in b0.parameters())
        assert all(p.is_meta for p in b1.parameters())
        assert [p.shape for p in b1.parameters()] == [p.shape for p in b0.parameters()]
        assert b1.mlp.up_proj.weight.shape[0] == len(entry["kept_channels"]) < 96
    assert not m1.model.embed_tokens.weight.is_meta


@pytest.mark.parametrize("recovery", ["ridge-delta", "affine"])
def test_two_gloo_processes_match_one(dense, tmp_path, recovery):
    folder, calib = dense
    common = ["--model", folder, "--ratio", 0.3, "--calib-file", calib, "--recovery", recovery]
    one = _cli(*common, "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _cli(*common, "--output", tmp_path / "two", processes=2)
    assert two.returncode == 0, two.stderr
    assert not (tmp_path / "two.partial").exists()
    r1 = json.loads((tmp_path / "one" / "slimllm_report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "slimllm_report.json").read_text())
    assert r2["processes"] == 2 and "processes" not in r1
    for a, b in zip(r1["layers"], r2["layers"], strict=True):
        for key in ("kept_heads", "kept_kv_heads", "kept_channels", "ratio"):
            assert a[key] == b[key], key
        assert a["importance"] == pytest.approx(b["importance"], rel=1e-9)
        assert a["layer_cosine"] == pytest.approx(b["layer_cosine"], rel=1e-9)
    t1, t2 = folder_tensors(tmp_path / "one"), folder_tensors(tmp_path / "two")
    assert t1.keys() == t2.keys()
    worst = max(float((t1[k] - t2[k]).abs().max() / t1[k].abs().max().clamp_min(1e-30)) for k in t1)
    print(f"{recovery}: worst relative tensor difference {worst:.3e}")
    assert worst < 1e-6


def test_refused_combinations(dense, tmp_path):
    folder, calib = dense
    common = ["--model", folder, "--ratio", 0.3, "--calib-file", calib]
    resume = _cli(*common, "--output", tmp_path / "r", "--resume", processes=2)
    assert resume.returncode != 0, resume.stderr
    assert "DistributedError: --resume is not supported with several processes" in resume.stderr
    few = _cli(*common, "--output", tmp_path / "f", processes=2, batch_size=16)
    assert few.returncode != 0
    assert "1 calibration chunks for 2 processes" in few.stderr, few.stderr
    assert not (tmp_path / "f").exists()
