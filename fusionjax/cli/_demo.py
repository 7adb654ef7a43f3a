"""``fusionjax demo``: merging and alignment on digits; logit and knowledge fusion on text."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def select_methods(words: Sequence[str] | None, *, fast: bool = False) -> list[str]:
    """The demo's methods whose names contain one of ``words`` (all if ``None``).

    Args:
      words: Case-insensitive name fragments, or ``None`` (or empty) for every method.
      fast: Leave out the learned methods (they train for seconds each).

    Returns:
      Method names, in the table's order; never empty.

    Raises:
      ValueError: if a word matches no method, or ``fast`` leaves none of the matches;
        the message lists the available names.
    """
    from fusionjax.demo import _merging  # pylint: disable=g-import-not-at-top

    every = list(_merging.default_methods())
    methods = every
    if words:
        unmatched = [w for w in words if not any(w.lower() in m.lower() for m in every)]
        if unmatched:
            raise ValueError(
                f"no method matches {', '.join(map(repr, unmatched))}; "
                f"available: {', '.join(every)}"
            )
        methods = [m for m in every if any(w.lower() in m.lower() for w in words)]
    if fast:
        methods = [m for m in methods if m not in _merging.LEARNED_METHODS]
        if not methods:
            raise ValueError(
                "--fast leaves out every selected method (all are learned); "
                f"available with --fast: {', '.join(select_methods(None, fast=True))}"
            )
    return methods


def run_merge(args: argparse.Namespace) -> int:
    """``fusionjax demo [merge]``: every merging method on the multi-task testbed.

    Args:
      args: The parsed ``seed``, ``no_cache``, ``methods`` (already checked by
        :func:`select_methods`) and ``fast``.

    Returns:
      The exit status, 0.
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    from fusionjax import testbed  # pylint: disable=g-import-not-at-top
    from fusionjax.demo import _merging  # pylint: disable=g-import-not-at-top

    methods = select_methods(args.methods, fast=args.fast)
    start = time.perf_counter()
    with tqdm(total=1, desc="testbed", unit="step", leave=False, file=sys.stderr) as bar:
        tb = testbed.load(seed=args.seed, cache=not args.no_cache, progress=bar)
    print(
        f"fusionjax demo: digits testbed (seed {args.seed}), {len(tb.tasks)} tasks, "
        f"ready in {time.perf_counter() - start:.1f}s"
    )
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


def run_align(args: argparse.Namespace) -> int:
    """``fusionjax demo align``: interpolation barriers, OT fusion and derived specs.

    Args:
      args: The parsed ``seed`` and ``fast``.

    Returns:
      The exit status, 0.
    """
    from fusionjax.demo import _alignment  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    seeds = [args.seed]
    print(
        f"fusionjax demo align: digits classifiers trained from different initialisations "
        f"(seed {args.seed}: models {2 * args.seed} and {2 * args.seed + 1})"
    )
    print("\n1. Linear interpolation between two MLPs (64-w-w-10), test set:")
    print(_alignment.format_barriers(_alignment.barrier_study(seeds)[args.seed]))
    print(
        "\n2. One-shot fusion without fine-tuning (OTFusion); for different widths the "
        "vanilla\n   average keeps the wider model's first units:"
    )
    print(_alignment.format_fusion(_alignment.fusion_study(seeds)[args.seed]))
    print(
        f"\n   PLeaS on the {_alignment.PLEAS_WIDTH}-unit pair: merged width 1-2x the models' "
        "(partial\n   matching, then per-layer least squares on 1024 unlabelled images):"
    )
    print(_alignment.format_merges(_alignment.pleas_study(tuple(seeds))[args.seed]))
    print(
        "\n   CLAFusion: a 64-64-64 MLP with a 64-64 one (cross-layer alignment, identity "
        "layers,\n   OT fusion); and OT fusion of three 64-64 MLPs:"
    )
    print(_alignment.format_merges(_alignment.clafusion_study(tuple(seeds))[args.seed]))
    if not args.fast:
        print(
            "\n3. Weight matching with the hand-written spec vs the spec derived from the "
            "jaxpr\n   (midpoint = average of the two aligned models; the ResNet's BatchNorm "
            "statistics\n   re-estimated on 512 training images at every point):"
        )
        print(_alignment.format_specs(_alignment.spec_study(seeds)[args.seed]))
    print(f"\ndone in {time.perf_counter() - start:.0f}s")
    return 0


def run_logits(args: argparse.Namespace) -> int:
    """``fusionjax demo logits``: logit fusion on the byte-level language testbed.

    Args:
      args: The parsed ``seed`` and ``no_cache``.

    Returns:
      The exit status, 0.
    """
    import jax  # pylint: disable=g-import-not-at-top

    from fusionjax.demo import _logits  # pylint: disable=g-import-not-at-top
    from fusionjax.testbed import language  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    tb = language.load(seed=args.seed, cache=not args.no_cache, progress=_stderr_progress)
    print(
        f"fusionjax demo logits: byte-level language testbed (seed {args.seed}), strong "
        f"model {tb.config.strong_dim}x{tb.config.strong_depth}, small models "
        f"{tb.config.small_dim}x{tb.config.small_depth}, ready in "
        f"{time.perf_counter() - start:.1f}s"
    )
    print("\n1. Held-out perplexity per byte (lower is better) on each domain's text:")
    print(_logits.format_perplexities(_logits.perplexity_table(tb)))
    print("\n2. Sampled continuations (top-k 8, temperature 0.7, same key for both):")
    for prompt, domain in (("    def __init__(", "code"), ("The return value ", "docs")):
        g = _logits.generate(tb, prompt, domain, key=jax.random.key(args.seed))
        print(_logits.format_generation(g) + "\n")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0


def _stderr_progress(stage: str) -> None:
    print(f"  {stage} ...", file=sys.stderr)


def run_distill(args: argparse.Namespace) -> int:
    """``fusionjax demo distill``: knowledge fusion of three teachers into one byte-level model.

    Args:
      args: The parsed ``seed``, ``no_cache`` and ``fast`` (fewer windows and steps).

    Returns:
      The exit status, 0.
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    from fusionjax.demo import _distill  # pylint: disable=g-import-not-at-top
    from fusionjax.testbed import knowledge  # pylint: disable=g-import-not-at-top

    setup = _distill.DistillSetup(**(FAST_DISTILL if args.fast else {}))
    start = time.perf_counter()
    _stderr_progress(f"knowledge testbed (seed {args.seed})")
    tb = knowledge.load(seed=args.seed, cache=not args.no_cache)
    print(
        f"fusionjax demo distill: knowledge testbed (seed {args.seed}), ready in "
        f"{time.perf_counter() - start:.1f}s\nevery student: the byte-level base "
        f"({_shape(tb.target_module)}) trained {setup.steps} steps of {setup.batch_size} "
        f"windows on {setup.windows} windows per corpus, λ = {setup.lam}"
    )
    # The rows' count is not known up front (the table grows with the library): the bar
    # counts finished rows and names the one being computed.
    with tqdm(desc="distill", unit="row", leave=False, file=sys.stderr) as bar:
        started = []

        def progress(name):
            if started:
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        rows = _distill.distillation_rows(tb, setup, progress=progress)
        if started:
            bar.update(1)
    print("\n1. The teachers (different tokenizers and architectures) and the target's base:")
    print(format_teachers(tb, rows))
    print(
        "\n2. Held-out bits per byte (lower is better) of the base after distillation "
        "from each target:"
    )
    print(_distill.format_distill_table(rows))
    print(f"\ndone in {time.perf_counter() - start:.0f}s")
    return 0


FAST_DISTILL = {"windows": 64, "steps": 60}
"""``fusionjax demo distill --fast``: the :class:`DistillSetup` fields it changes."""


def _shape(module) -> str:
    return f"width {module.dim}, depth {module.depth}"


def format_teachers(tb, rows) -> str:
    """The knowledge testbed's models: tokenizer, size, bytes per token and bits per byte.

    Args:
      tb: A :class:`fusionjax.testbed.knowledge.KnowledgeTestbed`.
      rows: The table's rows (:func:`fusionjax.demo._distill.distillation_rows`); the
        teachers' and the base's bits per byte are read from the rows of those names.

    Returns:
      A text table, one line per teacher and one for the base.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    bits = {r.name: r.bits for r in rows}
    corpora = list(next(iter(bits.values())))
    held = np.concatenate([tb.heldout[c] for c in corpora])
    models = []
    for d in tb.domains:
        teacher = tb.teachers[d]
        tokens = sum(len(t) for t in teacher.encode_batch(list(held)))
        vocab = f"BPE {teacher.module.vocab_size}"
        models.append((f"bpe[{d}]", vocab, _shape(teacher.module), held.size / tokens))
    models.append(("byte", "bytes 256", _shape(tb.language.strong_module), 1.0))
    models.append(("base", "bytes 256", _shape(tb.target_module), 1.0))
    head = (
        f"{'model':<11}{'tokenizer':<11}{'size':<18}{'bytes/token':>12}"
        + "".join(f"{c:>9}" for c in corpora)
    )
    lines = [head, "-" * len(head)]
    for name, tokenizer, size, per_token in models:
        cells = "".join(f"{bits[name][c]:>9.3f}" for c in corpora) if name in bits else ""
        lines.append(f"{name:<11}{tokenizer:<11}{size:<18}{per_token:>12.2f}{cells}")
    return "\n".join(lines)
