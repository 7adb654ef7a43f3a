"""The ``fusionjax`` console script: argument parsing and dispatch."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import fusionjax
from fusionjax.cli import _demo

# Help texts are printed as they are: plain text, no reStructuredText markup.
_DESCRIPTION = "fusionjax: deep-model fusion in JAX. Run 'fusionjax demo' for a tour."


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="fusionjax", description=_DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"fusionjax {fusionjax.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="merge fine-tuned models (default), align independently trained ones, or fuse "
        "language models' logits",
        description="Merge fine-tuned models on the multi-task digits testbed (merge, the "
        "default), align independently trained models (align), or fuse the next-byte "
        "predictions of language models on the byte-level text testbed (logits).",
    )
    demo.add_argument(
        "suite",
        nargs="?",
        choices=("merge", "align", "logits"),
        default="merge",
        help="merge: weight merging on the multi-task testbed (default); "
        "align: permutation alignment and OT fusion of independently trained models; "
        "logits: proxy-tuning, DExperts, contrastive decoding and Dynamic Logit Fusion",
    )
    demo.add_argument("--seed", type=int, default=0, help="testbed seed (default 0)")
    demo.add_argument(
        "--no-cache", action="store_true", help="retrain instead of loading the cache"
    )
    demo.add_argument(
        "--methods",
        nargs="*",
        default=None,
        metavar="WORD",
        help="merge: only methods whose names contain one of these words "
        "(case-insensitive); a word that matches no method is an error that lists them",
    )
    demo.add_argument(
        "--fast",
        action="store_true",
        help="merge: skip the learned methods (AdaMerging, aTLAS, ...); "
        "align: skip the ResNet/transformer spec comparison",
    )
    return parser, demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionjax`` console script.

    Args:
      argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
      The exit status. Usage errors (an unknown option or method) exit with status 2
      through :class:`SystemExit`, as :mod:`argparse` does.
    """
    parser, demo = _parser()
    args = parser.parse_args(argv)
    # args.command == "demo", the only command.
    if args.suite in ("align", "logits"):
        if args.methods is not None:
            demo.error("--methods applies to the merge suite only")
        return _demo.run_align(args) if args.suite == "align" else _demo.run_logits(args)
    try:
        _demo.select_methods(args.methods, fast=args.fast)  # checked before any training
    except ValueError as e:
        demo.error(str(e))
    return _demo.run_merge(args)
