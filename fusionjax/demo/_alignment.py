r"""The alignment suite behind ``fusionjax demo align`` and the alignment evidence tests.

Networks of one architecture are trained on the digits from different random
initialisations (:mod:`fusionjax.testbed.classifiers`); evaluation seed ``s`` uses the
pair trained with seeds ``2s`` and ``2s + 1``. Three studies:

* **Barriers** (Git Re-Basin, Fig. 2 and 5): test loss and accuracy along the linear
  path between the two MLPs, naively and after weight matching / activation matching,
  for several widths.
* **OT fusion** (OTFusion, Table 1): one-shot fused model (no fine-tuning) vs vanilla
  averaging, for two MLPs of equal width and of different widths.
* **PLeaS** (Nasery et al. 2025): partial matching to a merged width of 1 to 2 times the
  models' width, then per-layer least squares, vs weight matching and averaging.
* **CLAFusion** (Nguyen et al. 2023): a deeper (3 hidden layers) and a shallower (2) MLP
  fused by cross-layer alignment, identity padding and OT fusion, vs the vanilla average
  of the aligned, padded layers; and OT fusion of three models.
* **Specs** on a ResNet (BatchNorm, statistics re-estimated after merging) and a
  transformer: weight matching with the hand-written spec vs the spec derived from the
  jaxpr.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax import alignment
from fusionjax import zoo
from fusionjax._src.base import Params
from fusionjax.alignment._spec import path_str
from fusionjax.testbed import classifiers

WIDTHS = (16, 64, 256)
"""Hidden widths of the two-hidden-layer MLPs in the barrier study."""

OT_WIDTHS = (64, 128)
"""Widths of the reference and the wider model in the OT fusion study."""

ACTIVATION_EXAMPLES = 512
"""Training images whose activations activation matching correlates."""

BATCH_NORM_EXAMPLES = 512
"""Training images on which BatchNorm statistics are re-estimated after merging."""


@dataclasses.dataclass(frozen=True)
class Curve:
    """Test loss and accuracy along the path from ``ref`` (t=0) to ``other`` (t=1)."""

    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    @property
    def loss_barrier(self) -> float:
        """Largest excess loss over the line between the endpoints."""
        curve = alignment.InterpolationCurve(self.t, self.loss)
        return float(alignment.barrier(curve))

    @property
    def accuracy_barrier(self) -> float:
        """Largest accuracy drop below the line between the endpoints."""
        curve = alignment.InterpolationCurve(self.t, self.accuracy)
        return float(alignment.barrier(curve, higher_is_better=True))

    @property
    def midpoint_accuracy(self) -> float:
        """Accuracy of the average ``(ref + other) / 2``."""
        return float(self.accuracy[len(self.t) // 2])


@functools.cache
def _test_metrics(model):
    """``variables -> {"loss", "accuracy"}`` on the test set, one function per model.

    The same function object for every pair of a model lets
    :func:`~fusionjax.alignment.interpolation_curve` compile its curve once.
    """
    data = classifiers.digits()
    return lambda v: classifiers.metrics(model, v, data.x_test, data.y_test)


def _curve(model, ref: Params, other: Params, num: int = 11) -> Curve:
    """The curve on the test set (BatchNorm models: statistics re-estimated at each point)."""
    data = classifiers.digits()
    if "batch_stats" not in ref:
        out = alignment.interpolation_curve(_test_metrics(model), ref, other, num=num)
        return Curve(
            np.asarray(out.t), np.asarray(out.values["loss"]), np.asarray(out.values["accuracy"])
        )
    # BatchNorm: the running statistics of an interpolated model are wrong (REPAIR, Jordan
    # et al. 2023); re-estimate them on training images at every point.
    t = np.linspace(0.0, 1.0, num)
    batches = [data.x_train[i : i + 256] for i in range(0, BATCH_NORM_EXAMPLES, 256)]
    points = []
    for ti in t:
        v = alignment.reset_batch_stats(
            model.apply, alignment.interpolate(ref, other, float(ti)), batches, train=False
        )
        points.append(classifiers.evaluate(model, v, data.x_test, data.y_test))
    return Curve(
        t,
        np.array([float(p["loss"]) for p in points]),
        np.array([float(p["accuracy"]) for p in points]),
    )


def _pairs(model, seeds: Sequence[int], **train_kwargs) -> dict[int, tuple[Params, Params]]:
    """``{seed: (ref, other)}``, all models trained in one vmapped run.

    Cached per (model, seeds, options): the barrier and OT fusion studies share their
    width-64 MLP pairs, and a planted-permutation check can reuse them (arrays are
    immutable, so sharing is safe).
    """
    return dict(_trained_pairs(model, tuple(seeds), tuple(sorted(train_kwargs.items()))))


@functools.lru_cache(maxsize=16)
def _trained_pairs(model, seeds: tuple[int, ...], train_items: tuple) -> tuple:
    trained = classifiers.train_classifiers(
        model, [m for s in seeds for m in (2 * s, 2 * s + 1)], **dict(train_items)
    )
    return tuple((s, (trained[2 * i], trained[2 * i + 1])) for i, s in enumerate(seeds))


def _activations(model, variables: Params, spec: alignment.PermutationSpec) -> dict:
    x = classifiers.digits().x_train[:ACTIVATION_EXAMPLES]
    return alignment.group_activations(model.apply, variables, x, spec=spec)


# ----------------------------------------------------------------------------- barriers


@dataclasses.dataclass(frozen=True)
class BarrierOutput:
    """One MLP pair: endpoint accuracies and the curve of each alignment method."""

    width: int
    endpoint_accuracy: tuple[float, float]
    curves: dict  # method -> Curve


def barrier_study(
    seeds: Sequence[int], widths: Sequence[int] = WIDTHS
) -> dict[int, list[BarrierOutput]]:
    """``{seed: [BarrierOutput per width]}`` for two-hidden-layer MLPs."""
    out: dict[int, list[BarrierOutput]] = {s: [] for s in seeds}
    spec = alignment.mlp_spec(2)
    for width in widths:
        model = zoo.MLP((width, width))
        for seed, (ref, other) in _pairs(model, seeds).items():
            wm = alignment.weight_matching(spec, ref, other, key=jax.random.key(seed))
            am = alignment.activation_matching(
                spec, (_activations(model, ref, spec), _activations(model, other, spec))
            )
            curves = {
                "naive": _curve(model, ref, other),
                "weight matching": _curve(model, ref, wm.apply(other)),
                "activation matching": _curve(model, ref, am.apply(other)),
            }
            acc = (classifiers.accuracy(model, ref), classifiers.accuracy(model, other))
            out[seed].append(BarrierOutput(width, acc, curves))
    return out


# ----------------------------------------------------------------------------- OT fusion


@dataclasses.dataclass(frozen=True)
class FusionOutput:
    """Test accuracy (%) of the individual models and of each one-shot fusion."""

    widths: tuple[int, int]
    accuracy: dict  # row name -> accuracy


def _truncated(spec: alignment.PermutationSpec, wide: Params, narrow: Params) -> Params:
    """``wide`` cut to ``narrow``'s widths by keeping the first units of every group."""
    sizes = spec.sizes(narrow)
    keep = {g: jnp.arange(n) for g, n in sizes.items()}
    axes = spec.leaf_axes(wide)

    def cut(kp, leaf):
        for axis, g in enumerate(axes.get(path_str(kp), ())):
            if g is not None:
                leaf = jnp.take(leaf, keep[g], axis=axis)
        return leaf

    return jax.tree_util.tree_map_with_path(cut, wide)


def fusion_study(seeds: Sequence[int], widths: tuple[int, int] = OT_WIDTHS) -> dict:
    """``{seed: [FusionOutput equal widths, FusionOutput different widths]}``."""
    spec = alignment.mlp_spec(2)
    narrow, wide = widths
    model = zoo.MLP((narrow, narrow))
    wide_model = zoo.MLP((wide, wide))
    pairs = _pairs(model, seeds)
    wide_models = classifiers.train_classifiers(wide_model, [2 * s + 1 for s in seeds])
    acc = lambda v: 100 * classifiers.accuracy(model, v)  # noqa: E731
    out = {}
    for i, seed in enumerate(seeds):
        ref, other = pairs[seed]
        equal = {
            "model A": acc(ref),
            "model B": acc(other),
            "vanilla average": acc(alignment.interpolate(ref, other, 0.5)),
            "OT fusion (exact)": acc(alignment.ot_fusion(spec, ref, other).fused),
            "OT fusion (Sinkhorn)": acc(
                alignment.ot_fusion(spec, ref, other, solver="sinkhorn").fused
            ),
        }
        big = wide_models[i]
        cut = _truncated(spec, big, ref)
        different = {
            "model A": acc(ref),
            "model B": 100 * classifiers.accuracy(wide_model, big),
            "vanilla average": acc(alignment.interpolate(ref, cut, 0.5)),
            "OT fusion (Sinkhorn)": acc(
                alignment.ot_fusion(spec, ref, big, solver="sinkhorn").fused
            ),
        }
        out[seed] = [FusionOutput((narrow, narrow), equal), FusionOutput((narrow, wide), different)]
    return out


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class SpecOutput:
    """One architecture: whether the specs agree, and alignment quality with each."""

    architecture: str
    same_groups: bool
    objective: dict  # spec name -> weight matching objective
    curves: dict  # row -> Curve


def _spec_case(name: str, model, hand, ref: Params, other: Params, num: int) -> SpecOutput:
    x = classifiers.digits().x_train[:2]
    if "batch_stats" in ref:
        apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    else:
        apply = model.apply
    derived = alignment.derive_spec(apply, ref, x)
    objective, curves = {}, {"naive": _curve(model, ref, other, num)}
    for spec_name, spec in (("hand spec", hand), ("derived spec", derived)):
        out = alignment.weight_matching(spec, ref, other, key=jax.random.key(0))
        objective[spec_name] = float(out.objective)
        curves[spec_name] = _curve(model, ref, out.apply(other), num)
    return SpecOutput(name, derived.same_groups(hand, ref), objective, curves)


def spec_study(
    seeds: Sequence[int],
    *,
    resnet_steps: int = 300,
    resnet_points: int = 5,
    transformer_steps: int = 600,
) -> dict[int, list[SpecOutput]]:
    """``{seed: [ResNet result, transformer result]}``.

    The ResNet has BatchNorm; every point of its curves has its statistics
    re-estimated (:func:`fusionjax.alignment.reset_batch_stats`), ``resnet_points`` points
    per curve, after ``resnet_steps`` training steps; the transformer is trained for
    ``transformer_steps``. That the derived spec aligns as the hand spec does needs no
    training at all, so a test may pass fewer steps than the demo.
    """
    resnet = zoo.ResNet(blocks=1, width=1, norm="batch")
    transformer = zoo.Transformer(dim=32, depth=1, heads=4, mlp_width=64)
    cases = [
        ("ResNet (BatchNorm)", resnet, alignment.resnet_spec(1, norm="batch"), resnet_points),
        ("Transformer", transformer, alignment.transformer_spec(1), 11),
    ]
    out: dict[int, list[SpecOutput]] = {s: [] for s in seeds}
    for name, model, hand, num in cases:
        steps = resnet_steps if model is resnet else transformer_steps
        for seed, (ref, other) in _pairs(model, seeds, steps=steps).items():
            out[seed].append(_spec_case(name, model, hand, ref, other, num))
    return out


# ----------------------------------------------------------------------------- PLeaS

PLEAS_WIDTH = 16
"""Hidden width of the MLP pairs PLeaS merges (the barrier study's narrowest pairs)."""

PLEAS_RATIOS = (1.0, 1.25, 1.5, 2.0)
"""Merged widths, as multiples of the models' width."""

PLEAS_EXAMPLES = 1024
"""Training images (unlabelled) on which PLeaS matches units and solves each layer."""


def _layers(variables: Params) -> list:
    """A :class:`fusionjax.zoo.MLP`'s ``Dense_i`` layers in order."""
    p = variables["params"]
    return [p[f"Dense_{i}"] for i in range(len(p))]


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _chain_metrics(layers) -> tuple[float, float]:
    """``(accuracy %, loss)`` of a ReLU dense chain on the test set (NumPy: no compilation)."""
    data = classifiers.digits()
    h = np.asarray(_flat(data.x_test), np.float64)
    for i, layer in enumerate(layers):
        h = h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    y = np.asarray(data.y_test)
    z = h - h.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return 100.0 * float(np.mean(h.argmax(-1) == y)), float(-logp[np.arange(len(y)), y].mean())


@dataclasses.dataclass(frozen=True)
class MergeOutput:
    """Test accuracy (%) and loss of each merge of one pair (row name -> value)."""

    width: int
    accuracy: dict
    loss: dict


@functools.lru_cache(maxsize=4)
def pleas_study(
    seeds: tuple[int, ...], width: int = PLEAS_WIDTH, ratios: tuple = PLEAS_RATIOS
) -> dict[int, MergeOutput]:
    """``{seed: MergeOutput}``: models, weight matching + average, PLeaS at each width."""
    model = zoo.MLP((width, width))
    spec = alignment.mlp_spec(2)
    x = _flat(classifiers.digits().x_train[:PLEAS_EXAMPLES])
    out = {}
    for seed, (ref, other) in _pairs(model, seeds).items():
        wm = alignment.weight_matching(spec, ref, other, key=jax.random.key(seed))
        rows = {
            "model A": _chain_metrics(_layers(ref)),
            "model B": _chain_metrics(_layers(other)),
            "weight matching + avg": _chain_metrics(
                _layers(alignment.interpolate(ref, wm.apply(other), 0.5))
            ),
            "partial avg. (1.0x)": _chain_metrics(
                alignment.pleas(_layers(ref), _layers(other), x, least_squares=False).layers
            ),
        }
        for r in ratios:
            merged = alignment.pleas(_layers(ref), _layers(other), x, width_ratio=r)
            rows[f"PLeaS ({r:g}x)"] = _chain_metrics(merged.layers)
        acc = {k: v[0] for k, v in rows.items()}
        loss = {k: v[1] for k, v in rows.items()}
        out[seed] = MergeOutput(width, acc, loss)
    return out


# ----------------------------------------------------------------------------- CLAFusion

DEEP_WIDTHS = (64, 64, 64)
"""Hidden widths of the deeper MLP CLAFusion fuses with the 64-64 one."""


@functools.lru_cache(maxsize=4)
def clafusion_study(seeds: tuple[int, ...]) -> dict[int, MergeOutput]:
    """``{seed: MergeOutput}``: a 64-64-64 MLP (seed 2s+1) with a 64-64 one (seed 2s).

    Rows: the two models, the vanilla average of the deeper model and the padded
    shallower one (its layers placed by the cross-layer alignment, identity layers in
    between), CLAFusion (exact OT); CLAFusion's other balancing, the deeper model's
    unmapped layer merged into the next (ReLU gated by the sign of its summed
    pre-activations), that merged model alone, its vanilla average with the shallower
    one, and their CLAFusion; and OT fusion of three 64-64 models (pair ``s`` and the
    first model of pair ``s + 1``) vs their vanilla average.
    """
    narrow, _ = OT_WIDTHS
    shallow_model = zoo.MLP((narrow, narrow))
    pairs = _pairs(shallow_model, seeds)
    deep = _pairs(zoo.MLP(DEEP_WIDTHS), seeds)
    x = _flat(classifiers.digits().x_train[:ACTIVATION_EXAMPLES])
    spec = alignment.mlp_spec(2)
    out = {}
    for i, seed in enumerate(seeds):
        shallow, deep_model = _layers(pairs[seed][0]), _layers(deep[seed][1])
        cla = alignment.clafusion(deep_model, shallow, x)
        vanilla = [
            jax.tree.map(lambda a, b: (a + b) / 2, u, v)
            for u, v in zip(deep_model, cla.padded, strict=True)
        ]
        merge = alignment.clafusion(deep_model, shallow, x, balance="merge")
        vanilla_merged = [
            jax.tree.map(lambda a, b: (a + b) / 2, u, v)
            for u, v in zip(shallow, merge.merged, strict=True)
        ]
        third = pairs[seeds[(i + 1) % len(seeds)]][0]
        three = [pairs[seed][0], pairs[seed][1], third]
        rows = {
            "deeper model": _chain_metrics(deep_model),
            "shallower model": _chain_metrics(shallow),
            "vanilla average": _chain_metrics(vanilla),
            "CLAFusion": _chain_metrics(cla.fused),
            "deeper, layers merged": _chain_metrics(merge.merged),
            "vanilla avg. (merged)": _chain_metrics(vanilla_merged),
            "CLAFusion (merge)": _chain_metrics(merge.fused),
            "3 models: vanilla": _chain_metrics(
                _layers(jax.tree.map(lambda *v: sum(v) / len(v), *three))
            ),
            "3 models: OT fusion": _chain_metrics(
                _layers(alignment.ot_fusion_many(spec, three).fused)
            ),
        }
        acc = {k: v[0] for k, v in rows.items()}
        loss = {k: v[1] for k, v in rows.items()}
        out[seed] = MergeOutput(narrow, acc, loss)
    return out


def format_merges(result: MergeOutput) -> str:
    """One row per merge: test accuracy and loss."""
    lines = [f"{'':<24}{'test acc. (%)':>14}{'test loss':>11}", "-" * 49]
    for row, acc in result.accuracy.items():
        lines.append(f"{row:<24}{acc:>14.1f}{result.loss[row]:>11.3f}")
    return "\n".join(lines)


BarrierResult = BarrierOutput  # deprecated names (renamed to the *Output convention)
FusionResult = FusionOutput
SpecResult = SpecOutput


# ----------------------------------------------------------------------------- tables


def format_barriers(results: Sequence[BarrierOutput]) -> str:
    """One row per width and method: loss barrier, accuracy barrier, midpoint accuracy."""
    lines = [
        f"{'width':>6}  {'method':<20} {'loss barrier':>12} {'acc. barrier':>12} "
        f"{'midpoint acc.':>13}",
        "-" * 68,
    ]
    for r in results:
        for method, c in r.curves.items():
            lines.append(
                f"{r.width:>6}  {method:<20} {c.loss_barrier:>12.3f} "
                f"{100 * c.accuracy_barrier:>11.1f}% {100 * c.midpoint_accuracy:>12.1f}%"
            )
    return "\n".join(lines)


def format_fusion(results: Sequence[FusionOutput]) -> str:
    """Accuracy of each fusion, one column per width pair."""
    rows = list(dict.fromkeys(k for r in results for k in r.accuracy))
    head = "".join(f"{f'{a} + {b}':>14}" for a, b in (r.widths for r in results))
    lines = [f"{'test accuracy (%)':<22}{head}", "-" * (22 + 14 * len(results))]
    for row in rows:
        cells = "".join(
            f"{r.accuracy[row]:>14.1f}" if row in r.accuracy else f"{'·':>14}" for r in results
        )
        lines.append(f"{row:<22}{cells}")
    return "\n".join(lines)


def format_specs(results: Sequence[SpecOutput]) -> str:
    """Per architecture: barrier and midpoint accuracy naive, with the hand and derived spec."""
    lines = [
        f"{'model':<20} {'alignment':<14} {'objective':>10} {'loss barrier':>12} "
        f"{'midpoint acc.':>13}",
        "-" * 73,
    ]
    for r in results:
        for row, c in r.curves.items():
            obj = f"{r.objective[row]:>10.1f}" if row in r.objective else f"{'':>10}"
            lines.append(
                f"{r.architecture:<20} {row:<14} {obj} {c.loss_barrier:>12.3f} "
                f"{100 * c.midpoint_accuracy:>12.1f}%"
            )
        lines.append(f"{'':<20} derived spec == hand spec: {r.same_groups}")
    return "\n".join(lines)
