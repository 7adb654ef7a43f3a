"""The ``fusionjax`` command line: ``fusionjax demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Optional


def select_methods(words: Optional[Sequence[str]], *, fast: bool = False) -> list[str]:
    """The demo's methods whose names contain one of ``words`` (all if ``None``).

    Args:
      words: Case-insensitive name fragments, or ``None`` for every method.
      fast: Leave out the learned methods (they train for seconds each).

    Returns:
      Method names, in the table's order.
    """
    from fusionjax.demo import _merging  # pylint: disable=g-import-not-at-top

    methods = list(_merging.default_methods())
    if words:
        methods = [m for m in methods if any(w.lower() in m.lower() for w in words)]
    if fast:
        methods = [m for m in methods if m not in _merging.LEARNED_METHODS]
    return methods


def _demo(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    from fusionjax import testbed  # pylint: disable=g-import-not-at-top
    from fusionjax.demo import _merging  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    with tqdm(total=1, desc="testbed", unit="step", leave=False, file=sys.stderr) as bar:
        tb = testbed.load(seed=args.seed, cache=not args.no_cache, progress=bar)
    print(
        f"fusionjax demo: digits testbed (seed {args.seed}), {len(tb.tasks)} tasks, "
        f"ready in {time.perf_counter() - start:.1f}s"
    )
    methods = select_methods(args.methods, fast=args.fast)
    with tqdm(
        total=len(methods), desc="merging", unit="method", leave=False, file=sys.stderr
    ) as bar:

        def progress(name):
            bar.set_postfix_str(name)
            bar.update(1)

        rows = _merging.run_merging_suite(tb, methods=methods, progress=progress)
    print()
    print(_merging.format_table(tb.task_names, rows))
    print(
        "\nTest accuracy (%) per task of the merged encoder with each task's fixed head."
        "\nλ marked (val) was chosen on a validation slice of the training data."
    )
    for row in rows:
        if row.name == "AdaMerging (layer-wise)":
            print("\nLayer-wise AdaMerging's learned λ (rows: parameter tensors, columns: tasks):")
            print(_merging.format_coefficients(tb.task_names, row.details))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fusionjax`` console script."""
    parser = argparse.ArgumentParser(prog="fusionjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="merge fine-tuned models on the digits testbed")
    demo.add_argument("--seed", type=int, default=0, help="testbed seed (default 0)")
    demo.add_argument(
        "--no-cache", action="store_true", help="retrain instead of loading the cache"
    )
    demo.add_argument(
        "--methods", nargs="*", default=None, help="only methods whose names contain these words"
    )
    demo.add_argument(
        "--fast", action="store_true", help="skip the learned methods (AdaMerging, aTLAS, ...)"
    )
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
