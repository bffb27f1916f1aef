"""`python -m slimllm inspect DIR`: per-layer shapes and parameter counts, the pruning report,
and optionally a PNG of layer importances and ratios (a thin layer over
:mod:`slimllm.evaluation.inspection`).

Examples::

    python -m slimllm inspect out/smollm2-20
    python -m slimllm inspect out/smollm2-20 --plot smollm2-20.png
    python -m slimllm inspect out/smollm2-20 --json > smollm2-20.json

Reads only config.json, the safetensors headers and slimllm_report.json (no weights are
loaded), for a slimllm-pruned folder or a dense Hugging Face folder. Tables (or JSON with
--json) go to stdout, messages to stderr.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``inspect`` on ``parser``."""
    parser.add_argument(
        "dir",
        metavar="DIR",
        help="model folder: a slimllm-pruned output or a dense Hugging Face folder "
        "(config.json + *.safetensors)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PATH.png",
        help="also write a PNG of layer importances, per-layer pruning ratios and kept "
        "heads/channels (needs matplotlib)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print everything as one JSON object on stdout instead of the tables",
    )


def run(args: argparse.Namespace) -> int:
    """Check --plot first (suffix, folder, matplotlib), read the folder, print, plot."""
    import json
    import sys

    from slimllm.evaluation.inspection import check_plot_path, format_info, inspect_folder, plot_info

    if args.plot is not None:
        check_plot_path(args.plot)
    info = inspect_folder(args.dir)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(format_info(info))
    for warning in info.warnings:
        print(f"slimllm inspect: warning: {warning}", file=sys.stderr)
    if args.plot is not None:
        path = plot_info(info, args.plot)
        print(f"slimllm inspect: wrote {path}", file=sys.stderr)
    return 0
