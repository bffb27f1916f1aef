"""Serving bench: dense vs slimllm-pruned SmolLM2 in llama.cpp (f32 / f16 / q8_0 GGUF exports)
and in transformers, side by side in one run.

For every variant (dense, pruned 20% / 50%, and the ``--channel-multiple 64`` prunes of those):
the pruned folder is made once with ``python -m slimllm prune`` (C4 calibration from the data
folder) and cached under ``--work`` (reruns skip pruning and exports), then exported with
``python -m slimllm export --outtype T`` for each ``--outtypes`` T. Measured:

- llama.cpp prefill / greedy-decode tokens/s (``slimllm.evaluation.llamacpp.compare_speed``:
  one random prompt, all models loaded, repeats interleaved, medians), same ``--threads``;
- transformers (fp32) prefill / decode tokens/s of the folders
  (``slimllm.evaluation.evaluate.compare_speed``, same prompt length, tokens and repeats);
- peak RSS: llama.cpp, growth of this process's VmHWM over loading the file and one warm-up run
  (weights mmapped and touched + KV cache + compute buffers); transformers, weights + the peak
  RSS growth of one run (``SpeedResult.peak_memory_bytes``);
- GGUF tensor types per export (how many 2-D weights were stored as Q8_0 / F16 / ...);
- WikiText-2 perplexity over the first ``--ppl-windows`` windows of 128 tokens: llama.cpp per
  export (``llamacpp.perplexity``) vs transformers on the folder (``evaluate_perplexity``, what
  ``slimllm eval`` runs), the same windows (``tokenize_windows``, the folder's tokenizer).

    nice python benches/serve.py --threads 2                       # default set
    nice python benches/serve.py --variants dense,20,20cm64 --outtypes q8_0 --reps 3
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import default_model, load_dense, log  # noqa: E402
from speed import hwm, reset_hwm, rss, table  # noqa: E402

#: variant name -> (ratio, channel multiple); "dense" is the unpruned model
VARIANTS = {"dense": (0.0, 1), "20": (0.2, 1), "20cm64": (0.2, 64), "50": (0.5, 1), "50cm64": (0.5, 64)}


def prune_folder(name: str, dense_dir: Path, work: Path, calib: str, args) -> Path:
    ratio, cm = VARIANTS[name]
    if ratio == 0:
        return dense_dir
    dest = work / f"pruned-{name}"
    if (dest / "config.json").is_file():
        log(f"{name}: cached {dest}")
        return dest
    cmd = [sys.executable, "-m", "slimllm", "prune", "--model", str(dense_dir), "--ratio", str(ratio),
           "--channel-multiple", str(cm), "--calib-file", calib, "--num-samples", str(args.num_samples),
           "--threads", str(args.threads), "--output", str(dest), "--no-progress"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    log(f"{name}: pruned in {time.perf_counter() - t:.0f} s")
    return dest


def export(folder: Path, name: str, outtype: str, work: Path) -> Path:
    out = work / f"{name}.{outtype}.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "slimllm", "export", str(folder), "--format", "gguf",
                        "--outtype", outtype, "--output", str(out)], check=True)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """Count of the 2-D tensors of a GGUF file by stored type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp / transformers serving bench, dense vs pruned",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=".gguf or HF folder (default: SmolLM2-135M GGUF)")
    p.add_argument("--work", default="bench-out/serve", help="cache of dense / pruned folders and exports")
    p.add_argument("--json", default=None, help="JSON output (default WORK/serve.json)")
    p.add_argument("--variants", default="dense,20,20cm64,50,50cm64", help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--outtypes", default="f32,f16,q8_0")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--num-samples", type=int, default=32, help="calibration sequences for prune")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=64, help="0 skips perplexity")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    outtypes = [t for t in a.outtypes.split(",") if t]

    import torch

    torch.set_num_threads(a.threads)
    from slimllm.evaluation import llamacpp
    from slimllm.evaluation.evaluate import compare_speed, evaluate_perplexity, load_ppl_text, tokenize_windows
    from slimllm.evaluation.tasks import resolve_data_dir
    from slimllm.io.checkpoint import load_model

    load0 = os.getloadavg()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dense_dir = work / "dense"
    dense, _ = load_dense(a.model or default_model(), dense_dir)
    del dense
    gc.collect()
    data = resolve_data_dir(a.data_dir)
    folders = {n: prune_folder(n, dense_dir, work, str(data / "c4" / "c4_sample.jsonl"), a) for n in names}
    files = {(n, t): export(folders[n], n, t, work) for n in names for t in outtypes}

    # ---- llama.cpp speed (all models loaded, interleaved repeats) and peak RSS growth
    n_ctx = a.prompt_len + a.new_tokens
    keys, llms, peak = list(files), [], {}
    for key in keys:
        gc.collect()
        reset_hwm()
        before = rss()
        llm = llamacpp.load_gguf(files[key], n_ctx=n_ctx, n_threads=a.threads)
        llamacpp.compare_speed([llm], prompt_len=a.prompt_len, new_tokens=a.new_tokens, warmup=0, repeats=1)
        peak[key] = hwm() - before
        llms.append(llm)
    log("llama.cpp speed ...")
    cpp = dict(zip(keys, llamacpp.compare_speed(llms, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                                                 repeats=a.reps)))
    for llm in llms:
        llm.close()
    del llms
    gc.collect()

    # ---- transformers speed
    hf = {}
    if not a.no_transformers:
        log("transformers speed ...")
        models = [load_model(str(folders[n]))[0] for n in names]
        hf = dict(zip(names, compare_speed(models, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                                           repeats=a.reps)))
        del models
        gc.collect()

    # ---- perplexity: the same windows in both
    ppl_cpp, ppl_hf = {}, {}
    if a.ppl_windows:
        text, source = load_ppl_text("wikitext2", data)
        for n in names:
            model, tok = load_model(str(folders[n]))
            windows = tokenize_windows(tok, text, 128, a.ppl_windows)
            ppl_hf[n] = evaluate_perplexity(model, tok, "wikitext2", data_dir=data, max_windows=a.ppl_windows).ppl
            del model
            for t in outtypes:
                ppl_cpp[(n, t)] = llamacpp.perplexity(files[(n, t)], windows, n_threads=a.threads).ppl
            log(f"{n}: PPL transformers {ppl_hf[n]:.3f}, llama.cpp "
                + ", ".join(f"{t} {ppl_cpp[(n, t)]:.3f}" for t in outtypes))
    load1 = os.getloadavg()

    # ---- table
    rows = []
    for n in names:
        for t in outtypes:
            s, d = cpp[(n, t)], cpp[(names[0], t)]
            rows.append([n, f"llama.cpp {t}", f"{s.prefill_tokens_per_s:.0f}",
                         f"{s.prefill_tokens_per_s / d.prefill_tokens_per_s:.2f}x",
                         f"{s.decode_tokens_per_s:.1f}", f"{s.decode_tokens_per_s / d.decode_tokens_per_s:.2f}x",
                         f"{peak[(n, t)] / 2**20:.0f}", f"{ppl_cpp[(n, t)]:.3f}" if ppl_cpp else "-",
                         " ".join(f"{k}:{v}" for k, v in sorted(tensor_types(files[(n, t)]).items()))])
        if n in hf:
            s, d = hf[n], hf[names[0]]
            mem = (s.peak_memory_bytes or 0) + s.weight_bytes
            rows.append([n, "transformers fp32", f"{s.prefill_tokens_per_s:.0f}",
                         f"{s.prefill_tokens_per_s / d.prefill_tokens_per_s:.2f}x",
                         f"{s.decode_tokens_per_s:.1f}", f"{s.decode_tokens_per_s / d.decode_tokens_per_s:.2f}x",
                         f"{mem / 2**20:.0f}", f"{ppl_hf[n]:.3f}" if ppl_hf else "-", ""])
    from slimllm.evaluation.llamacpp import import_llama_cpp

    text = (f"Serving (llama-cpp-python {import_llama_cpp().__version__}): batch 1, prompt {a.prompt_len}, "
            f"{a.new_tokens} new tokens, median of {a.reps}, "
            f"{a.threads} threads; ratios vs the first variant ({names[0]}) of the same engine/type; "
            f"WikiText-2 PPL over {a.ppl_windows} x 128 windows; load average {load0[0]:.2f} -> "
            f"{load1[0]:.2f} on {os.cpu_count()} CPUs\n\n"
            + table(["variant", "engine", "prefill tok/s", "vs first", "decode tok/s", "vs first",
                     "peak RSS MiB", "PPL", "2-D tensor types"], rows))
    print(text)
    out = Path(a.json) if a.json else work / "serve.json"
    out.write_text(json.dumps({
        "args": vars(a), "load_avg": [load0, load1],
        "llamacpp": {f"{n}/{t}": {**cpp[(n, t)].to_dict(), "peak_rss_growth_bytes": peak[(n, t)],
                                  "tensor_types": tensor_types(files[(n, t)]),
                                  "ppl": ppl_cpp.get((n, t)), "file": str(files[(n, t)])} for n, t in keys},
        "transformers": {n: {**hf[n].to_dict(), "ppl": ppl_hf.get(n)} for n in hf},
    }, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
