"""`python -m slimllm eval`: perplexity, zero-shot accuracy (lm-eval) and speed of a model.

Examples::

    python -m slimllm eval --model out/smollm2-20 --ppl wikitext2,ptb --max-windows 512
    python -m slimllm eval --model out/smollm2-20 --tasks all --limit 100 --json eval.json
    python -m slimllm eval --model out/smollm2-20 --compare SmolLM2-135M.gguf

With none of --ppl, --ppl-file, --tasks, --speed, --compare the command measures WikiText-2 and
PTB perplexity. The numbers go to stdout as tables and, with --json, to a file (the dict of
:func:`build_report`). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from slimllm.errors import CheckpointError, ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``eval`` on ``parser``."""
    parser.add_argument("--model", required=True, help="model folder, .gguf file or hub id")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights dtype")
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 gives steadier timings on a busy machine",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="evaluation data folder (default: $SLIMLLM_DATA_DIR, else ../shared/data)",
    )
    g = parser.add_argument_group("perplexity")
    g.add_argument(
        "--ppl",
        default=None,
        help="comma-separated texts: wikitext2, ptb (test), ptb_valid, or a hub id "
        "owner/name[:config[:split]]; 'none' to skip (default: wikitext2,ptb when nothing "
        "else is asked for)",
    )
    g.add_argument(
        "--ppl-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a local text file to score (verbatim; .jsonl: the 'text' fields); repeatable",
    )
    g.add_argument("--seq-len", type=int, default=128, help="window length in tokens")
    g.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    g.add_argument("--batch-size", type=int, default=1, help="windows / lm-eval requests per forward")
    g = parser.add_argument_group("zero-shot (lm-eval)")
    g.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval task names (boolq,piqa,hellaswag,winogrande,arc_easy,"
        "arc_challenge,openbookqa) or 'all'",
    )
    g.add_argument("--limit", type=int, default=None, help="only the first N documents per task")
    g.add_argument(
        "--task-source",
        default="local",
        choices=("local", "hub"),
        help="local: slimllm's configs over --data-dir; hub: lm-eval's own configs and hub data",
    )
    g = parser.add_argument_group("speed")
    g.add_argument("--speed", action="store_true", help="measure prefill/decode tokens/s and peak memory")
    g.add_argument(
        "--compare",
        default=None,
        metavar="MODEL",
        help="a second (e.g. dense) model measured for speed side by side (implies --speed)",
    )
    g.add_argument("--speed-prompt-len", type=int, default=128, help="prompt tokens")
    g.add_argument("--speed-new-tokens", type=int, default=128, help="greedy decode steps")
    g.add_argument("--speed-batch-size", type=int, default=1, help="sequences per run")
    g.add_argument("--speed-warmup", type=int, default=1, help="untimed runs first")
    g.add_argument("--speed-repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")


def _positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def _ppl_names(args: argparse.Namespace) -> list[str]:
    if args.ppl is None:
        nothing_else = not (args.ppl_file or args.tasks or args.speed or args.compare)
        return ["wikitext2", "ptb"] if nothing_else else []
    names = [n.strip() for n in args.ppl.split(",") if n.strip()]
    return [] if names == ["none"] else names


def _validate(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Check everything that can be checked before loading a model; return (ppl texts, tasks)."""
    from slimllm.evaluation import evaluate

    _positive("--seq-len", args.seq_len, allow_none=False)
    if args.seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {args.seq_len}")
    for name in ("max_windows", "limit"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--threads", args.threads)
    for name in ("batch_size", "speed_prompt_len", "speed_new_tokens", "speed_batch_size", "speed_repeats"):
        _positive("--" + name.replace("_", "-"), getattr(args, name), allow_none=False)
    if args.speed_warmup < 0:
        raise ConfigError(f"--speed-warmup must be >= 0, got {args.speed_warmup}")
    texts = _ppl_names(args)
    for name in texts:
        if name not in evaluate.PPL_DATASETS and "/" not in name and not Path(name).is_file():
            raise ConfigError(
                f"--ppl {name!r}: unknown text (known: {', '.join(evaluate.PPL_DATASETS)}; "
                "or a hub id owner/name[:config[:split]]; local files go to --ppl-file)"
            )
    for path in args.ppl_file:
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"--ppl-file {path}: no such file")
    tasks: list[str] = []
    if args.tasks:
        tasks = evaluate.check_tasks(
            args.tasks.split(","), task_source=args.task_source, data_dir=args.data_dir
        )
    if args.compare:
        text = args.compare
        looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1
        if looks_local and not Path(text).expanduser().exists():
            raise CheckpointError(f"--compare {text}: no such model folder or file")
    if args.json:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--json {args.json}: folder {parent} does not exist")
    if not (texts or args.ppl_file or tasks or args.speed or args.compare):
        raise ConfigError("nothing to measure: --ppl none and no --ppl-file, --tasks or --speed")
    return texts, tasks


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(source: str, dtype: str, device: str):
    """Load ``(model, tokenizer)`` for evaluation via :func:`slimllm.io.checkpoint.load_model`
    (the model in eval mode)."""
    from slimllm.io.checkpoint import load_model

    model, tokenizer = load_model(source, dtype=dtype, device=device)
    model.eval()
    return model, tokenizer


def _log(msg: str) -> None:
    print(f"[slimllm eval] {msg}", file=sys.stderr, flush=True)


def build_report(
    args: argparse.Namespace, model, tokenizer, texts: list[str], tasks: list[str], device: str
) -> dict[str, Any]:
    """Run the requested measurements on a loaded model and return the JSON-ready report:
    ``{"model", "dtype", "device", "parameters", "settings", "perplexity": {name: ...},
    "zero_shot": {...} | None, "speed": {"models": {label: ...}} | None, "versions"}``."""
    import torch
    import transformers

    import slimllm
    from slimllm.evaluation import evaluate

    report: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {
            "threads": torch.get_num_threads(),
            "seq_len": args.seq_len,
            "max_windows": args.max_windows,
            "batch_size": args.batch_size,
            "limit": args.limit,
            "task_source": args.task_source,
            "data_dir": str(evaluate.resolve_data_dir(args.data_dir)),
        },
        "perplexity": {},
        "zero_shot": None,
        "speed": None,
        "compare": args.compare,
        "versions": {
            "slimllm": slimllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    for name in [*texts, *args.ppl_file]:
        r = evaluate.evaluate_perplexity(
            model,
            tokenizer,
            name,
            data_dir=args.data_dir,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=sys.stderr.isatty(),
        )
        report["perplexity"][name] = r.to_dict()
        _log(f"{name}: ppl {r.ppl:.3f} ({r.windows} windows x {r.seq_len} tokens, {r.seconds:.1f} s)")
    if tasks:
        _log(f"zero-shot: {', '.join(tasks)}" + (f" (first {args.limit} docs each)" if args.limit else ""))
        report["zero_shot"] = evaluate.zero_shot(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            task_source=args.task_source,
        )
        report["versions"]["lm_eval"] = report["zero_shot"]["lm_eval_version"]
    if args.speed or args.compare:
        models = {"model": model}
        if args.compare:
            _log(f"loading {args.compare} for the speed comparison")
            models["compare"] = load(args.compare, args.dtype, device)[0]
        _log("speed: " + " vs ".join(models))
        results = evaluate.compare_speed(
            list(models.values()),
            prompt_len=args.speed_prompt_len,
            new_tokens=args.speed_new_tokens,
            batch_size=args.speed_batch_size,
            warmup=args.speed_warmup,
            repeats=args.speed_repeats,
        )
        report["speed"] = {
            "models": {label: r.to_dict() for label, r in zip(models, results)},
            "sources": {"model": args.model, **({"compare": args.compare} if args.compare else {})},
        }
        if args.compare:
            a, b = results
            report["speed"]["ratio_model_over_compare"] = {
                "prefill_tokens_per_s": a.prefill_tokens_per_s / b.prefill_tokens_per_s,
                "decode_tokens_per_s": a.decode_tokens_per_s / b.decode_tokens_per_s,
                "parameters": a.parameters / b.parameters,
            }
    return report


def _write_json(path: str, report: dict[str, Any]) -> None:
    target = Path(path).expanduser()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--json {path}: cannot write: {err}") from err


def run(args: argparse.Namespace) -> int:
    """Validate the options, load the model, measure, print the tables, write --json."""
    from slimllm.evaluation import evaluate

    texts, tasks = _validate(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = _device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, args.dtype, device)
    _log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    report = build_report(args, model, tokenizer, texts, tasks, device)
    if args.json:
        _write_json(args.json, report)
    print(evaluate.format_report(report))
    if args.json:
        _log(f"wrote {args.json}")
    return 0
