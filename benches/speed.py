"""Speed bench: where slimllm's prune time and memory go, against the lower bound, and the
inference speed of the pruned models.

1. Lower bound: the calibration forward passes alone -- the same N x L tokens through the same
   dense model (decoder stack, no LM head, chunks of ``--batch-size``), the least any
   calibration-based method has to do once.
2. ``prune_model`` at each ``--ratios`` target (fresh model each time), wall time by stage from
   its report (``timings``: forward, statistics, ranking, greedy, regression, slicing; time
   outside every timed stage is "other"), then ``save_pruned`` timed as "saving". Peak RSS by
   stage is sampled every ``--rss-interval`` seconds by a background thread that reads the
   stage the pipeline is in (its ``_Timings`` stack: a private detail, see README) and
   ``/proc/self/status``; the overall peak is the kernel's exact VmHWM.
3. Self-calibration: the time to sample ``--self-calib-samples`` sequences of ``--seq-len``
   tokens from the dense model at each ``--self-calib-batches`` batch size (prune's
   ``--calib-batch-size``), one after another on the same model and seed.
4. Inference: prefill and greedy-decode tokens/s, dense vs every pruned model side by side
   (``slimllm.evaluation.evaluate.compare_speed``: shared prompt, interleaved timed repeats, medians), the
   pruned models loaded back from their saved folders.

    python benches/speed.py                  # 20% and 50%, default (ridge-delta) recovery
    python benches/speed.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import default_model, load_dense, log  # noqa: E402

STAGES = ("forward", "statistics", "ranking", "greedy", "regression", "slicing", "other", "saving")
STAGE_LABEL = {
    "forward": "calibration forwards",
    "statistics": "statistics (hooks -> core)",
    "ranking": "ranking (scores, head stats)",
    "greedy": "greedy head search",
    "regression": "regression (recovery fit)",
    "slicing": "slicing",
    "other": "other (plan, capture setup, ...)",
    "saving": "saving (save_pruned)",
}


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageSampler:
    """Background RSS sampler attributing each sample to the pipeline stage running then.

    The stage is read from the live ``slimllm.pruning.pipeline._Timings`` instances (their ``_stack``);
    without that private class every sample counts as "other". ``label`` overrides it (used
    for saving, which runs outside prune_model)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.label: str | None = None
        self._timings: list = []
        self._stop = threading.Event()
        self._patched = None
        try:
            from slimllm.pruning import pipeline

            cls = pipeline._Timings
            orig = cls.__init__
            timings = self._timings

            def init(obj, *a, **kw):
                orig(obj, *a, **kw)
                timings.append(obj)

            cls.__init__ = init
            self._patched = (cls, orig)
        except (ImportError, AttributeError):
            pass
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def tracks_stages(self) -> bool:
        return self._patched is not None

    def _stage(self) -> str:
        if self.label:
            return self.label
        for t in reversed(self._timings):
            stack = getattr(t, "_stack", None)
            if stack:
                try:
                    return stack[-1][0]
                except (IndexError, TypeError):
                    pass
        return "other"

    def _run(self):
        while not self._stop.is_set():
            stage, value = self._stage(), rss()
            if value > self.peak.get(stage, 0):
                self.peak[stage] = value
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._patched:
            cls, orig = self._patched
            cls.__init__ = orig
        return False


@torch.no_grad()
def lower_bound(model, calib, batch_size: int) -> dict:
    """Time of the calibration forward passes alone (decoder stack, no LM head), after one
    untimed warm-up chunk."""
    from slimllm.families.adapters import get_adapter

    base = get_adapter(model).base_model(model)
    chunks = calib.input_ids.split(batch_size)
    base(input_ids=chunks[0], use_cache=False)
    reset_hwm()
    start_rss = rss()
    t = time.perf_counter()
    for c in chunks:
        base(input_ids=c, use_cache=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rss_start": start_rss, "peak_rss": hwm()}


def self_calibration_speed(model, tokenizer, batches, num_samples: int, seq_len: int, seed: int) -> list[dict]:
    """Wall time of ``self_generated`` for each batch size in ``batches`` (same model, samples,
    length and seed), as seconds and milliseconds per generated token."""
    from slimllm.pruning.calibration import self_generated

    out = []
    for b in batches:
        t = time.perf_counter()
        self_generated(model, tokenizer, num_samples, seq_len, seed, batch_size=b)
        seconds = time.perf_counter() - t
        out.append({"batch_size": b, "seconds": seconds,
                    "ms_per_token": 1000 * seconds / (num_samples * (seq_len - 1))})
        log(f"self-calibration at batch {b}: {num_samples} x {seq_len} tokens in {seconds:.1f} s")
    return out


def mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="slimllm prune-time and inference-speed bench",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M GGUF)")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--recovery", default="ridge-delta", choices=["affine", "ridge", "ridge-delta", "none"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--calib", default=None, help="calibration .jsonl (default: DATA/c4/c4_sample.jsonl)")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--self-calib-batches", default="8,32",
                   help="--calib-batch-size values timed for self-calibration ('' skips)")
    p.add_argument("--self-calib-samples", type=int, default=32, help="sequences each one samples")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--speed-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss-interval", type=float, default=0.01, help="RSS sampling period (s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quick", action="store_true", help="8 calibration sequences, short speed run")
    a = p.parse_args(argv)
    if a.quick:
        a.num_samples = min(a.num_samples, 8)
        a.self_calib_samples = min(a.self_calib_samples, 8)
        a.prompt_len, a.new_tokens, a.repeats = 32, 8, 1
    if a.threads:
        torch.set_num_threads(a.threads)

    from slimllm.pruning.calibration import load_calibration
    from slimllm.io.checkpoint import load_model, load_pruned, save_pruned
    from slimllm.evaluation.evaluate import compare_speed
    from slimllm.pruning.pipeline import PruneConfig, prune_model
    from slimllm.evaluation.tasks import resolve_data_dir

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in a.ratios.split(",") if r]
    source = a.model or default_model()
    cache = None if a.no_cache else out / "cache" / "dense"
    t = time.perf_counter()
    dense, tok = load_dense(source, cache)
    load_s = time.perf_counter() - t
    # reload from the cached folder so every prune starts from the same fresh state
    reload_src = str(cache) if cache is not None and (cache / "config.json").is_file() else source
    calib_path = a.calib or str(resolve_data_dir(a.data_dir) / "c4" / "c4_sample.jsonl")
    calib = load_calibration(tok, calib_file=calib_path, num_samples=a.num_samples,
                             seq_len=a.seq_len, seed=a.seed)
    n_tokens = calib.num_samples * calib.seq_len
    lb = lower_bound(dense, calib, a.batch_size)
    log(f"lower bound: {n_tokens} calibration tokens through the dense model in {lb['seconds']:.2f} s")
    self_calib = self_calibration_speed(dense, tok, [int(b) for b in a.self_calib_batches.split(",") if b],
                                        a.self_calib_samples, a.seq_len, a.seed)
    del dense
    gc.collect()

    results = []
    saved = {}
    for ratio in ratios:
        model, _ = load_model(reload_src)
        gc.collect()
        reset_hwm()
        start_rss = rss()
        cfg = PruneConfig(ratio=ratio, recovery=a.recovery, progress=False, batch_size=a.batch_size)
        with StageSampler(a.rss_interval) as sampler:
            t = time.perf_counter()
            model, report = prune_model(model, tok, calib, cfg)
            prune_s = time.perf_counter() - t
            dest = out / f"speed-pruned-{int(round(ratio * 100))}"
            if dest.exists():
                shutil.rmtree(dest)
            sampler.label = "saving"
            t = time.perf_counter()
            save_pruned(model, tok, dest, report)
            save_s = time.perf_counter() - t
        peak_all = hwm()
        timings = dict(report.get("timings") or {})
        total = timings.pop("total", prune_s)
        timings["other"] = max(0.0, total - sum(timings.values()))
        timings["saving"] = save_s
        results.append({
            "ratio": ratio,
            "achieved_ratio": report["parameters"]["achieved_ratio"],
            "prune_total_s": total,
            "timings": timings,
            "stage_peak_rss": sampler.peak,
            "tracks_stages": sampler.tracks_stages,
            "rss_start": start_rss,
            "peak_rss": peak_all,
            "saved": str(dest),
        })
        saved[ratio] = dest
        log(f"{ratio:.0%}: prune {total:.1f} s + save {save_s:.1f} s, peak RSS {mib(peak_all)} MiB")
        del model
        gc.collect()

    # ---- tables
    parts = [
        f"Prune time by stage: SmolLM2-135M, {calib.num_samples} x {calib.seq_len} calibration tokens, "
        f"recovery {a.recovery}, batch {a.batch_size}, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        "",
    ]
    header = ["stage"]
    for r in results:
        header += [f"{r['ratio']:.0%} s", f"{r['ratio']:.0%} share", f"{r['ratio']:.0%} peak RSS MiB"]
    rows = []
    for st in STAGES:
        if not any(st in r["timings"] for r in results):
            continue
        row = [STAGE_LABEL[st]]
        for r in results:
            s = r["timings"].get(st, 0.0)
            full = r["prune_total_s"] + r["timings"]["saving"]
            row += [f"{s:.2f}", f"{100 * s / full:.1f}%", mib(r["stage_peak_rss"].get(st))]
        rows.append(row)
    row = ["**total (prune + save)**"]
    for r in results:
        full = r["prune_total_s"] + r["timings"]["saving"]
        row += [f"**{full:.2f}**", "100%", mib(r["peak_rss"])]
    rows.append(row)
    row = ["lower bound: calibration forwards alone"]
    for _ in results:
        row += [f"{lb['seconds']:.2f}", "", mib(lb["peak_rss"])]
    rows.append(row)
    row = ["**overhead ratio** (total / lower bound)"]
    for r in results:
        row += [f"**{(r['prune_total_s'] + r['timings']['saving']) / lb['seconds']:.1f}x**", "", ""]
    rows.append(row)
    row = ["forward stage / lower bound"]
    for r in results:
        row += [f"{r['timings'].get('forward', 0.0) / lb['seconds']:.1f}x", "", ""]
    rows.append(row)
    parts.append(table(header, rows))
    parts.append("")
    parts.append(
        f"RSS before pruning (model loaded): {', '.join(mib(r['rss_start']) + ' MiB' for r in results)}; "
        "peak RSS per stage is sampled every "
        f"{a.rss_interval * 1000:.0f} ms"
        + ("" if all(r["tracks_stages"] for r in results) else " (stage tracking unavailable: all under 'other')")
        + "; the total row is the kernel's exact peak (VmHWM)."
    )

    if self_calib:
        base = self_calib[0]
        parts += [
            "",
            f"Self-calibration: {a.self_calib_samples} x {a.seq_len} tokens sampled from the dense model",
            "",
            table(["--calib-batch-size", "s", "ms / token", f"speed-up vs {base['batch_size']}"],
                  [[str(r["batch_size"]), f"{r['seconds']:.1f}", f"{r['ms_per_token']:.1f}",
                    f"{base['seconds'] / r['seconds']:.2f}x"] for r in self_calib]),
        ]

    # ---- inference speed
    dense, _ = load_model(reload_src)
    models = [dense] + [load_pruned(str(saved[r])) for r in ratios]
    labels = ["dense"] + [f"slimllm {a.recovery} {r:.0%}" for r in ratios]
    speed = compare_speed(models, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                          batch_size=a.speed_batch, repeats=a.repeats)
    srows = []
    d0 = speed[0]
    for label, s in zip(labels, speed):
        srows.append([
            label,
            f"{s.parameters / 1e6:.1f}M",
            f"{s.prefill_tokens_per_s:.0f}",
            f"{s.prefill_tokens_per_s / d0.prefill_tokens_per_s:.2f}x",
            f"{s.decode_tokens_per_s:.1f}",
            f"{s.decode_tokens_per_s / d0.decode_tokens_per_s:.2f}x",
            mib(s.weight_bytes),
            mib(s.peak_memory_bytes),
        ])
    parts += [
        "",
        f"Inference ({d0.device}, batch {a.speed_batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
        f"median of {a.repeats}; peak = {d0.memory_kind})",
        "",
        table(["model", "params", "prefill tok/s", "vs dense", "decode tok/s", "vs dense",
               "weights MiB", "peak MiB"], srows),
    ]
    text = "\n".join(parts)
    (out / "speed.md").write_text(text + "\n")
    (out / "speed.json").write_text(json.dumps({
        "lower_bound": lb,
        "calibration_tokens": n_tokens,
        "self_calibration": self_calib,
        "prunes": results,
        "inference": {lab: s.to_dict() for lab, s in zip(labels, speed)},
        "model_load_seconds": load_s,
        "args": vars(a),
        "load_avg": os.getloadavg(),
    }, indent=1))
    print(text)
    print(f"\nwrote {out / 'speed.md'}, {out / 'speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
