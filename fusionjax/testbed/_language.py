r"""A byte-level language-model testbed for logit fusion (proxy-tuning, DExperts, DLF).

The setting of proxy-tuning (Liu et al. 2024) and Dynamic Logit Fusion (Fan et al.
2024), in about a minute on a CPU: a large *strong* model and a small *base* model, both
pretrained on general text; small *experts*, the base fine-tuned on one domain each;
and, as the upper bound a fusion method tries to reach without touching the strong
model's weights, the strong model fine-tuned on each domain with the experts' recipe.
Proxy-tuning decodes from

.. math::
  \log p \propto \log p_{\mathrm{strong}} + \alpha\,(\log p_{\mathrm{expert}}
  - \log p_{\mathrm{base}}).

**Text** (:mod:`fusionjax.testbed._corpus`; nothing is downloaded): the domains are
``code``, the standard library's top-level modules with comments and docstrings
removed, and ``docs``, the English reference documentation of :mod:`pydoc_data.topics`.
The general corpus is the same modules' docstrings and comments with 5% code and 5%
docs mixed in. Held out: 20% of the modules and of the topics, chosen by a hash of
their names (by document, so no held-out window shares a file with training text).

**Models**: :class:`fusionjax.zoo.Decoder` over bytes (vocabulary 256), context 64.
Strong: width 128, depth 3, 4 heads, MLP 512 (0.67 M parameters); small: width 64, depth
2, 4 heads, MLP 256 (0.14 M). Training is Adam (:math:`\beta_2 = 0.99`, gradients
clipped to norm 1) on batches of 32 random windows, 20 steps of linear warm-up then
cosine decay to 10% of the peak: pretraining 200 steps at 3e-3 for both models (3e-3
was the best strong rate of 1.5e-3, 3e-3, 5e-3); every domain fine-tuning, expert or
strong, 40 steps at 2e-3.

Measured over seeds 0, 1, 2 (Python 3.11.7; held-out perplexity per byte, 256 windows;
``proxy`` is proxy-tuning at :math:`\alpha = 1`; gap closed is
:math:`(\mathrm{nll}_{\mathrm{strong}} - \mathrm{nll}_{\mathrm{proxy}}) /
(\mathrm{nll}_{\mathrm{strong}} - \mathrm{nll}_{\mathrm{strong\,ft}})`):

::

  model            general                code                   docs
  strong           13.38 / 13.20 / 13.21  10.74 / 10.76 / 10.93  11.39 / 11.37 / 11.42
  base             14.57 / 14.54 / 14.68  12.15 / 11.92 / 12.36  12.87 / 12.75 / 12.68
  expert (own)                            9.13 / 9.21 / 9.29     11.45 / 11.54 / 11.56
  strong ft (own)                         8.07 / 8.02 / 8.11     9.78 / 9.66 / 9.84
  proxy (own)                             9.26 / 9.20 / 9.20     10.80 / 10.80 / 10.78

Gap closed at :math:`\alpha = 1`: code 52/53/58%, docs 35/32/39%; the best fixed
:math:`\alpha \in \{0.25, 0.5, \dots, 2\}` is 0.75 on every seed and domain, closing
56/56/59% (code) and 41/35/40% (docs); :math:`\alpha \geq 1.75` makes the strong model
worse than it was. The small expert's shift transfers, but not all of what the
fine-tuned strong model learns (proxy-tuning's paper closes 60-90% of *task accuracy*
gaps, not of perplexity). Building the three seeds took 137-190 s on two cores shared
with other jobs (load 3-4; 42-80 s per seed, compilation included, about 200 s of CPU),
and a cached load takes about 0.35 s per seed.

What costs time, and what is done about it: training, above all the strong model's
pretraining (about 60% of a build). Every run of one architecture (pretraining and
fine-tuning, every seed) shares one compiled loop
(:func:`fusionjax._src.training.run_steps` with a :class:`jax.tree_util.Partial` step):
the token streams, the span to sample from, the learning-rate schedule and the key are
arguments. Built models are cached on disk with the held-out windows, so a cached load
neither reads the stdlib nor trains.

Examples:
  >>> import fusionjax as fj
  >>> from fusionjax.testbed import language
  >>> tb = language.load(seed=0)  # doctest: +SKIP
  >>> lp = {n: tb.log_probs(m, p, tb.heldout["code"]) for n, m, p in tb.models()}  # doctest: +SKIP
  >>> fused = fj.logits.proxy_tuning(lp["strong"], lp["expert[code]"], lp["base"])  # doctest: +SKIP
  >>> language.perplexity(fused, tb.heldout["code"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import batches
from fusionjax._src import training
from fusionjax._src.progress import Progress as _Progress
from fusionjax.logits import proxy_tuning
from fusionjax.testbed import _cache
from fusionjax.testbed import _corpus
from fusionjax.testbed._corpus import DOMAINS
from fusionjax.testbed._corpus import CorpusConfig
from fusionjax.testbed._corpus import decode
from fusionjax.testbed._corpus import encode
from fusionjax.testbed._corpus import load_corpus
from fusionjax.zoo import _decoder
from fusionjax.zoo._decoder import Decoder

Params = Any

__all__ = [
    "DOMAINS",
    "CorpusConfig",
    "LanguageConfig",
    "LanguageTestbed",
    "decode",
    "encode",
    "load",
    "load_corpus",
    "log_probs",
    "nll",
    "perplexity",
]

_VERSION = "1"
_SOURCES = (_corpus, _decoder, training, sys.modules[__name__])


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Hyperparameters of the language testbed; all of them key the on-disk cache.

    Attributes:
      corpus: How the corpora are cut and mixed (:class:`CorpusConfig`).
      context_length: Tokens per training and evaluation window.
      heads: Attention heads of both models.
      strong_dim: Width of the strong model (MLP ``4 x``).
      strong_depth: Blocks of the strong model.
      small_dim: Width of the small base and experts (MLP ``4 x``).
      small_depth: Blocks of the small models.
      batch_size: Windows per step.
      warmup_steps: Linear warm-up steps of every run.
      strong_steps: Pretraining steps of the strong model.
      strong_learning_rate: Its peak learning rate.
      small_steps: Pretraining steps of the small base.
      small_learning_rate: Its peak learning rate.
      finetune_steps: Steps of every domain fine-tuning: each small expert (from the
        base) and each fine-tuned strong model (the upper bound) get the same recipe, as
        Llama-2-chat 7B and 70B did in proxy-tuning's experiments.
      finetune_learning_rate: Its peak learning rate.
      eval_windows: Held-out windows per corpus.
    """

    corpus: CorpusConfig = CorpusConfig()
    context_length: int = 64
    heads: int = 4
    strong_dim: int = 128
    strong_depth: int = 3
    small_dim: int = 64
    small_depth: int = 2
    batch_size: int = 32
    warmup_steps: int = 20
    strong_steps: int = 200
    strong_learning_rate: float = 3e-3
    small_steps: int = 200
    small_learning_rate: float = 3e-3
    finetune_steps: int = 40
    finetune_learning_rate: float = 2e-3
    eval_windows: int = 256

    def module(self, size: str) -> Decoder:
        """The :class:`fusionjax.zoo.Decoder` of ``size`` (``"strong"`` or ``"small"``)."""
        dim, depth = {
            "strong": (self.strong_dim, self.strong_depth),
            "small": (self.small_dim, self.small_depth),
        }[size]
        return Decoder(
            vocab_size=_corpus.VOCAB_SIZE,
            dim=dim,
            depth=depth,
            heads=self.heads,
            mlp_width=4 * dim,
            max_length=self.context_length,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageTestbed:
    """Strong and small byte-level LMs, domain experts and fine-tuned strong models.

    Attributes:
      config: The :class:`LanguageConfig` it was built with.
      seed: The seed it was built with.
      domains: Domain names, ``("code", "docs")``.
      strong_module: The strong :class:`fusionjax.zoo.Decoder`.
      small_module: The small one (base and experts).
      strong: Strong params (linen ``params`` collection), pretrained on general text.
      base: Small params, pretrained on general text.
      experts: ``{domain: params}``: the base fine-tuned on that domain.
      strong_finetuned: ``{domain: params}``: the strong model fine-tuned on that domain.
      heldout: ``{"general" | domain: [N, L] int32}`` held-out windows (other documents).
      build_seconds: ``{stage: seconds}`` of the build that made these models (read back
        from the cache with them).
    """

    config: LanguageConfig
    seed: int
    domains: tuple[str, ...]
    strong_module: Decoder
    small_module: Decoder
    strong: Params
    base: Params
    experts: dict[str, Params]
    strong_finetuned: dict[str, Params]
    heldout: dict[str, np.ndarray]
    build_seconds: dict[str, float]

    def log_probs(
        self, module: Decoder, params: Params, windows: np.ndarray, *, batch_size: int = 64
    ) -> np.ndarray:
        """Next-token log-probabilities of windows, ``[N, L, V]`` float32.

        Row ``[n, t]`` is the distribution of ``windows[n, t + 1]`` given ``windows[n, :t+1]``
        (the last position predicts past the window). Compiled once per module and batch
        size; windows run in padded batches.

        Args:
          module: :attr:`strong_module` or :attr:`small_module`.
          params: Its params.
          windows: ``[N, L]`` tokens, ``L <= context_length``.
          batch_size: Windows per compiled call.

        Returns:
          The log-probabilities, as a NumPy array.
        """
        return log_probs(module, params, windows, batch_size=batch_size)

    def models(self) -> list[tuple[str, Decoder, Params]]:
        """``(name, module, params)`` of every model: strong, base, experts, fine-tuned strong."""
        out = [("strong", self.strong_module, self.strong), ("base", self.small_module, self.base)]
        out += [(f"expert[{d}]", self.small_module, self.experts[d]) for d in self.domains]
        out += [
            (f"strong_ft[{d}]", self.strong_module, self.strong_finetuned[d]) for d in self.domains
        ]
        return out

    def perplexities(self, alpha: float = 1.0) -> dict[str, dict[str, float]]:
        """``{model: {corpus: perplexity}}`` on every held-out corpus, with proxy-tuning rows.

        Rows ``proxy[d]`` are the strong model proxy-tuned with expert ``d`` at ``alpha``.

        Args:
          alpha: Proxy-tuning strength.

        Returns:
          The nested dict, rows in :meth:`models` order then the proxy rows.
        """
        table = {}
        cache = {}
        for corpus, windows in self.heldout.items():
            for name, module, params in self.models():
                lp = self.log_probs(module, params, windows)
                cache[name] = lp
                table.setdefault(name, {})[corpus] = perplexity(lp, windows)
            for d in self.domains:
                expert = cache[f"expert[{d}]"]
                lp = proxy_tuning(cache["strong"], expert, cache["base"], alpha=alpha)
                table.setdefault(f"proxy[{d}]", {})[corpus] = perplexity(lp, windows)
        return table

    def describe(self, alpha: float = 1.0) -> str:
        """A text table of held-out perplexities (rows: models; columns: corpora).

        Args:
          alpha: Proxy-tuning strength of the ``proxy[d]`` rows.

        Returns:
          The table, with the build time.
        """
        table = self.perplexities(alpha)
        corpora = list(self.heldout)
        lines = [f"{'seed ' + str(self.seed):<16}" + "".join(f"{c:>10}" for c in corpora)]
        for name, row in table.items():
            lines.append(f"{name:<16}" + "".join(f"{row[c]:>10.3f}" for c in corpora))
        total = sum(self.build_seconds.values())
        lines.append(f"(held-out perplexity per byte; built in {total:.1f} s)")
        return "\n".join(lines)


def perplexity(log_probs: np.ndarray, windows: np.ndarray) -> float:
    """Per-token perplexity of ``windows`` under ``log_probs`` (positions ``1 .. L-1``).

    Args:
      log_probs: ``[N, L, V]`` from :meth:`LanguageTestbed.log_probs` (or a fusion of them).
      windows: ``[N, L]`` tokens.

    Returns:
      ``exp`` of the mean negative log-likelihood of ``windows[:, 1:]``.
    """
    return float(np.exp(nll(log_probs, windows)))


def nll(log_probs: np.ndarray, windows: np.ndarray) -> float:
    """Mean negative log-likelihood (nats per token) of ``windows[:, 1:]`` under ``log_probs``.

    Args:
      log_probs: ``[N, L, V]`` log-probabilities.
      windows: ``[N, L]`` tokens.

    Returns:
      The mean, a Python float.
    """
    lp = np.asarray(log_probs)[:, :-1]
    targets = np.asarray(windows)[:, 1:, None].astype(np.int64)
    return float(-np.mean(np.take_along_axis(lp, targets, axis=-1), dtype=np.float64))


def log_probs(
    module: Decoder, params: Params, windows: np.ndarray, *, batch_size: int = 64
) -> np.ndarray:
    """See :meth:`LanguageTestbed.log_probs`."""
    windows = np.asarray(windows, np.int32)
    out = []
    for batch, mask in batches.padded_batches(windows, windows.shape[0], batch_size):
        lp = np.asarray(_log_probs(module, params, batch))
        out.append(lp[: int(np.sum(np.asarray(mask)))])
    if not out:
        return np.zeros((0, windows.shape[1], module.vocab_size), np.float32)
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(module, params, tokens):
    return jax.nn.log_softmax(module.apply({"params": params}, tokens), axis=-1)


def _schedule(s, schedule):
    """Learning rate at step ``s`` of ``schedule = [peak, warmup, total]`` (float32)."""
    peak, warmup, total = schedule[0], schedule[1], schedule[2]
    t = s.astype(jnp.float32)
    ramp = jnp.minimum(1.0, (t + 1.0) / jnp.maximum(warmup, 1.0))
    progress = jnp.minimum(1.0, t / jnp.maximum(total, 1.0))
    return peak * ramp * (0.1 + 0.45 * (1.0 + jnp.cos(jnp.pi * progress)))


def _train_step(module, optimizer, batch_size, s, params, opt_state, tokens, span, schedule, key):
    """One Adam step on ``batch_size`` random windows of ``tokens[span[0] : span[0] + span[1]]``."""
    length = module.max_length + 1
    starts = span[0] + jax.random.randint(
        jax.random.fold_in(key, s), (batch_size,), 0, span[1] - length
    )
    batch = tokens[starts[:, None] + jnp.arange(length)[None, :]].astype(jnp.int32)

    def loss_fn(params):
        logits = module.apply({"params": params}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    lr = _schedule(s, schedule)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, opt_state, loss


# One object, so the compiled loop (keyed by the step's static part) is shared.
_OPTIMIZER = training.standard_promotion(
    optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.99))
)


def _train(module, params, tokens, span, *, steps, learning_rate, warmup, batch_size, key):
    """Trains ``params`` for ``steps`` on windows of ``tokens`` in ``span = (offset, size)``."""
    step = Partial(_train_step, module, _OPTIMIZER, batch_size)
    schedule = jnp.asarray([learning_rate, warmup, steps], jnp.float32)
    params, _, losses = training.run_steps(
        step,
        params,
        _OPTIMIZER.init(params),
        (tokens, jnp.asarray(span, jnp.int32), schedule, key),
        steps=steps,
        chunk=100,
    )
    return params, losses


def _build(config: LanguageConfig, seed: int, progress: _Progress):
    t0 = time.perf_counter()
    corpus = _corpus.load_corpus(config.corpus)
    timings = {"corpus": time.perf_counter() - t0}
    names = ("general",) + _corpus.DOMAINS
    streams = [corpus.train[n] for n in names]
    offsets = np.cumsum([0] + [len(s) for s in streams])
    spans = {n: (int(offsets[i]), len(streams[i])) for i, n in enumerate(names)}
    tokens = jnp.asarray(np.concatenate(streams))
    strong_module, small_module = config.module("strong"), config.module("small")
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    dummy = jnp.zeros((1, config.context_length), jnp.int32)

    def run(name, module, params, corpus_name, steps, lr):
        progress.start(name)
        t0 = time.perf_counter()
        out, _ = _train(
            module,
            params,
            tokens,
            spans[corpus_name],
            steps=steps,
            learning_rate=lr,
            warmup=config.warmup_steps,
            batch_size=config.batch_size,
            key=next(keys),
        )
        out = jax.block_until_ready(out)
        timings[name] = time.perf_counter() - t0
        progress.done()
        return out

    strong0 = strong_module.init(next(keys), dummy)["params"]
    small0 = small_module.init(next(keys), dummy)["params"]
    c = config
    lr = c.strong_learning_rate
    strong = run("strong", strong_module, strong0, "general", c.strong_steps, lr)
    base = run("base", small_module, small0, "general", c.small_steps, c.small_learning_rate)
    experts, finetuned = {}, {}
    for d in _corpus.DOMAINS:
        lr = c.finetune_learning_rate
        experts[d] = run(f"expert[{d}]", small_module, base, d, c.finetune_steps, lr)
    for d in _corpus.DOMAINS:
        finetuned[d] = run(
            f"strong_ft[{d}]", strong_module, strong, d, c.finetune_steps, c.finetune_learning_rate
        )
    heldout = {
        n: _corpus.windows(corpus.heldout[n], config.context_length, config.eval_windows)
        for n in names
    }
    return strong, base, experts, finetuned, heldout, timings


def _cache_path(config: LanguageConfig, seed: int) -> str:
    spec = {
        "config": dataclasses.asdict(config),
        "corpus": _corpus.fingerprint(config.corpus),
    }
    return _cache.path("language", _VERSION, spec, _SOURCES, seed)


def _roles(domains) -> list[str]:
    experts = [f"expert/{d}" for d in domains]
    return ["strong", "base"] + experts + [f"finetuned/{d}" for d in domains]


def _save(path: str, strong, base, experts, finetuned, heldout, timings) -> None:
    trees = [strong, base] + [experts[d] for d in experts] + [finetuned[d] for d in finetuned]
    arrays = {}
    for role, tree in zip(_roles(list(experts)), trees, strict=True):
        arrays.update({f"{role}/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))})
    arrays.update({f"heldout/{n}": w for n, w in heldout.items()})
    arrays["timings"] = np.asarray(json.dumps(timings))
    _cache.save(path, arrays)


def _restore(path: str, config: LanguageConfig):
    dummy = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    shapes = {
        size: jax.eval_shape(config.module(size).init, jax.random.key(0), dummy)["params"]
        for size in ("strong", "small")
    }
    domains = _corpus.DOMAINS
    with np.load(path) as data:

        def tree(role, size):
            leaves, treedef = jax.tree.flatten(shapes[size])
            out = [jnp.asarray(data[f"{role}/{i}"]) for i in range(len(leaves))]
            for a, s in zip(out, leaves, strict=True):
                if a.shape != s.shape or a.dtype != s.dtype:
                    raise ValueError(f"{path}: {role} is {a.shape} {a.dtype}, not {s.shape}")
            return jax.tree.unflatten(treedef, out)

        strong = tree("strong", "strong")
        base = tree("base", "small")
        experts = {d: tree(f"expert/{d}", "small") for d in domains}
        finetuned = {d: tree(f"finetuned/{d}", "strong") for d in domains}
        heldout = {n: np.asarray(data[f"heldout/{n}"]) for n in ("general",) + domains}
        timings = json.loads(str(data["timings"]))
    return strong, base, experts, finetuned, heldout, timings


def load(
    seed: int = 0,
    *,
    cache: bool = True,
    progress: Any | None = None,
    config: LanguageConfig | None = None,
) -> LanguageTestbed:
    """Builds the language testbed for ``seed``, or reads it from the on-disk cache.

    Building reads the corpora (a few seconds) and trains six models (strong, base, one
    expert and one fine-tuned strong model per domain): about 30 s on two CPU cores, plus
    a few seconds of compilation once per process. Training is deterministic in ``seed``
    (the corpora do not depend on it), and the cache returns exactly the trained arrays
    and the held-out windows.

    Args:
      seed: Seed of initialisation and batch sampling.
      cache: Read the models from, and write them to, ``$FUSIONJAX_CACHE`` (default
        ``~/.cache/fusionjax``); the file name holds the seed and a hash of the config,
        the code and the Python version and stdlib files the corpora come from.
      progress: ``None`` for silence; a callable, called with a message before each
        training run; a tqdm-like bar or class (updated once per run).
      config: Hyperparameters; :class:`LanguageConfig` defaults if ``None``.

    Returns:
      A :class:`LanguageTestbed`.

    Examples:
      >>> from fusionjax.testbed import language
      >>> tb = language.load(seed=0)  # doctest: +SKIP
      >>> print(tb.describe())  # doctest: +SKIP
    """
    config = LanguageConfig() if config is None else config
    path = _cache_path(config, seed)
    def build():
        bar = _Progress(progress, total=2 + 2 * len(_corpus.DOMAINS), desc="language testbed")
        try:
            return _build(config, seed, bar)
        finally:
            bar.close()

    built, _ = _cache.load_or_build(
        path,
        cache=cache,
        restore=lambda f: _restore(f, config),
        build=build,
        save=lambda f, b: _save(f, *b),
        progress=progress,
        desc="language testbed",
    )
    strong, base, experts, finetuned, heldout, timings = built
    return LanguageTestbed(
        config=config,
        seed=seed,
        domains=_corpus.DOMAINS,
        strong_module=config.module("strong"),
        small_module=config.module("small"),
        strong=strong,
        base=base,
        experts=experts,
        strong_finetuned=finetuned,
        heldout=heldout,
        build_seconds=timings,
    )
