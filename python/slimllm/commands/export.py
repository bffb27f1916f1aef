"""`python -m slimllm export DIR --format gguf|vllm --output OUT`: write a pruned (or plain HF)
folder as a GGUF file that stock llama.cpp runs (:func:`slimllm.io.gguf_export.export_gguf`)
or as a folder that stock vLLM loads (:func:`slimllm.io.vllm_export.export_vllm`).

Example::

    python -m slimllm export smollm2-pruned --format gguf --outtype f16 --output smollm2-pruned.gguf
    python -m slimllm export smollm2-pruned --format vllm --output smollm2-pruned-vllm
"""

from __future__ import annotations

import argparse

FORMATS = ("gguf", "vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``export`` on ``parser``."""
    from slimllm.io.gguf_export import OUTTYPES

    parser.add_argument("dir", metavar="DIR", help="a slimllm-pruned folder or a Hugging Face llama/mistral/qwen2/phi3/granite folder")
    parser.add_argument("--format", default="gguf", choices=FORMATS,
                        help="gguf: one .gguf file for llama.cpp; vllm: a folder for vLLM "
                             "(per-layer shapes as Nemotron-NAS, trust_remote_code=True)")
    parser.add_argument(
        "--outtype",
        default=None,
        help=f"gguf only: type of the 2-D weights, one of {', '.join(OUTTYPES)} (default f32; 1-D tensors stay f32)",
    )
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="the .gguf file or vLLM folder to create (must not exist; a vLLM folder may be empty)")
    parser.add_argument(
        "--vocab-gguf",
        default=None,
        metavar="FILE.gguf",
        help="gguf only: copy the tokenizer from this GGUF file (default: the GGUF the folder was "
        "pruned from, per its slimllm_report.json; else the folder's byte-level BPE tokenizer.json)",
    )


def run(args: argparse.Namespace) -> int:
    """Export; prints what was written. Errors are SlimLLMError subclasses."""
    import sys

    from slimllm.errors import ConfigError

    if args.format == "vllm":
        from slimllm.io.vllm_export import export_vllm

        if args.outtype is not None or args.vocab_gguf is not None:
            raise ConfigError("--outtype and --vocab-gguf apply to --format gguf only")
        path = export_vllm(args.dir, args.output)
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    else:
        from slimllm.io.gguf_export import export_gguf

        path = export_gguf(args.dir, args.output, outtype=args.outtype or "f32", vocab_gguf=args.vocab_gguf)
        size = path.stat().st_size
    print(f"slimllm export: wrote {path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0
