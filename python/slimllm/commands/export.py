"""`python -m slimllm export DIR --format gguf --output FILE.gguf`: write a pruned (or plain
HF) folder as a GGUF file that stock llama.cpp runs (a thin layer over
:func:`slimllm.io.gguf_export.export_gguf`).

Example::

    python -m slimllm export smollm2-pruned --format gguf --outtype f16 --output smollm2-pruned.gguf
"""

from __future__ import annotations

import argparse

FORMATS = ("gguf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``export`` on ``parser``."""
    from slimllm.io.gguf_export import OUTTYPES

    parser.add_argument("dir", metavar="DIR", help="a slimllm-pruned folder or a Hugging Face llama/mistral/qwen2 folder")
    parser.add_argument("--format", default="gguf", choices=FORMATS, help="output format")
    parser.add_argument(
        "--outtype",
        default="f32",
        help=f"type of the 2-D weights, one of {', '.join(OUTTYPES)} (1-D tensors stay f32)",
    )
    parser.add_argument("--output", required=True, metavar="FILE.gguf", help="file to create (must not exist)")
    parser.add_argument(
        "--vocab-gguf",
        default=None,
        metavar="FILE.gguf",
        help="copy the tokenizer from this GGUF file (default: the GGUF the folder was pruned "
        "from, per its slimllm_report.json; else the folder's byte-level BPE tokenizer.json)",
    )


def run(args: argparse.Namespace) -> int:
    """Export; prints the file written. Errors are SlimLLMError subclasses."""
    import sys

    from slimllm.io.gguf_export import export_gguf

    path = export_gguf(args.dir, args.output, outtype=args.outtype, vocab_gguf=args.vocab_gguf)
    print(f"slimllm export: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0
