"""Command line: ``python -m slimllm {prune,eval,inspect,export} ...``.

Each subcommand lives in ``slimllm.commands.<name>`` with ``add_arguments(parser)`` and
``run(args) -> int``; this module only dispatches. Errors of the ``SlimLLMError`` family are
printed as one line and give exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slimllm.errors import SlimLLMError

COMMANDS = {
    "prune": "Prune attention heads and MLP channels of a causal LM and save the result.",
    "eval": "Measure perplexity, zero-shot accuracy and speed of a (pruned) model.",
    "inspect": "Show per-layer shapes, parameter counts and the pruning report of a saved model.",
    "export": "Write a pruned model as a GGUF file that llama.cpp runs.",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except for flags (whose default only restates that they
    are off) and options without one (their help says what happens when they are not given),
    and keeps epilog line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slimllm",
        description="slimllm: structured pruning of LLMs (SlimLLM, ICML 2025).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"slimllm.commands.{name}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SlimLLMError as err:
        print(f"slimllm {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
