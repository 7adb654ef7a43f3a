"""The ``fusionjax`` console script: argument parsing and dispatch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fusionjax
from fusionjax.cli import _demo

# Help texts are printed as they are: plain text, no reStructuredText markup.
_DESCRIPTION = (
    "fusionjax: deep-model fusion in JAX. Run 'fusionjax demo' for a tour, "
    "'fusionjax merge CONFIG.yaml OUT' to merge checkpoints."
)

_MERGE_DESCRIPTION = """\
Merge checkpoints (safetensors files or directories, Orbax directories) as a YAML
config says, streaming leaf by leaf. The config is mergekit's format:

  merge_method: ties
  base_model: ckpt/base
  models:
    - model: ckpt/math
      parameters: {weight: 1.0, density: 0.5}
    - model: ckpt/code
      parameters:
        density: [0.2, 0.5, 0.8]        # a gradient over the layers
  parameters:
    lambda: 1.0
    density: [{filter: self_attn, value: 0.7}, {value: 0.5}]
  out_dtype: bfloat16

plus fusionjax keys: `format: safetensors|orbax` per model (default: detected),
`seed:` for random methods, `output: {format, dtype, max_shard_bytes}`,
`convention: mergekit|fusionjax` (default mergekit: reproduce mergekit's
defaults and tie rules; fusionjax: the factories' own defaults for what the
config leaves unset), `layout: none|hf|llama|gpt2|vit|timm_vit` (open the
checkpoints as flax leaves and write the output back in the checkpoint's own
layout; axis options follow torch vs flax layout).

Layer stacking (merge_method: passthrough):
  slices:
    - sources: [{model: ckpt/a, layer_range: [0, 16]}]
    - sources: [{model: ckpt/b, layer_range: [8, 24]}]
layers renumbered in order; other tensors from base_model or the first slice.
Every path, shape, dtype and parameter is checked before any tensor is read;
a bad config exits with status 2 (config) or 1 (checkpoints) and writes nothing.
"""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="fusionjax", description=_DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"fusionjax {fusionjax.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="merge fine-tuned models (default), align independently trained ones, fuse "
        "language models' logits, or distil teachers of different tokenizers into one model",
        description="Merge fine-tuned models on the multi-task digits testbed (merge, the "
        "default), align independently trained models (align), fuse the next-byte "
        "predictions of language models on the byte-level text testbed (logits), or distil "
        "teachers of different tokenizers and architectures into one byte-level model "
        "(distill: FuseLLM, FuseChat and the vocabulary-free losses).",
    )
    demo.add_argument(
        "suite",
        nargs="?",
        choices=("merge", "align", "logits", "distill"),
        default="merge",
        help="merge: weight merging on the multi-task testbed (default); "
        "align: permutation alignment and OT fusion of independently trained models; "
        "logits: proxy-tuning, DExperts, contrastive decoding and Dynamic Logit Fusion; "
        "distill: knowledge fusion of BPE and byte-level teachers into one student "
        "(a table of held-out bits per byte, about a minute of training)",
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
    merge = sub.add_parser(
        "merge",
        help="merge checkpoints as a YAML config (mergekit's format) says",
        description=_MERGE_DESCRIPTION,
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("config", metavar="CONFIG.yaml", help="the merge config")
    merge.add_argument("out", metavar="OUT", help="the output checkpoint (file or directory)")
    merge.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the plan (every leaf: shape, dtype, bytes, method and "
        "hyperparameters) and stop; reads no tensor and writes nothing",
    )
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    demo.add_argument(
        "--fast",
        action="store_true",
        help="merge: skip the learned methods (AdaMerging, aTLAS, ...); "
        "align: skip the ResNet/transformer spec comparison; "
        "distill: 64 windows per corpus and 60 steps per student (instead of 256 and 120)",
    )
    return parser, demo


def _methods_epilog() -> str:
    from fusionjax.cli import _config

    lines = ["merge methods (merge_method:):"]
    for name, m in sorted(_config.METHODS.items()):
        params = [*m.global_params, *(f"{k} (per model)" for k in m.model_params)]
        lines.append(f"  {name:<17} {m.doc}")
        if params:
            lines.append(f"  {'':<17} parameters: {', '.join(params)}")
    lines.append(
        "  fusionjax.NAME    fusionjax.merging.NAME(**parameters), NAME one of: "
        + ", ".join(_config.NATIVE)
    )
    return "\n".join(lines)


def _run_merge(args: argparse.Namespace) -> int:
    from fusionjax.cli import _config
    from fusionjax.cli import _merge

    try:
        return _merge.run(
            args.config,
            args.out,
            dry_run=args.dry_run,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except _config.ConfigError as e:
        print(f"fusionjax merge: config error: {e}", file=sys.stderr)
        return 2
    except _merge.CheckpointError as e:
        print(f"fusionjax merge: error: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionjax`` console script.

    Args:
      argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
      The exit status. Usage errors (an unknown option or method) exit with status 2
      through :class:`SystemExit`, as :mod:`argparse` does; ``fusionjax merge``
      returns 2 for a bad config and 1 for checkpoints that cannot be merged, with a
      one-line message naming the config key, before anything is read or written.
    """
    parser, demo = _parser()
    args = parser.parse_args(argv)
    if args.command == "merge":
        return _run_merge(args)
    if args.suite in ("align", "logits", "distill"):
        if args.methods is not None:
            demo.error("--methods applies to the merge suite only")
        run = {"align": _demo.run_align, "logits": _demo.run_logits, "distill": _demo.run_distill}
        return run[args.suite](args)
    try:
        _demo.select_methods(args.methods, fast=args.fast)  # checked before any training
    except ValueError as e:
        demo.error(str(e))
    return _demo.run_merge(args)
