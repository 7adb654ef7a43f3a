"""Shared pytest configuration: strict JAX numerics, one compilation cache, common fixtures."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest
import scipy.linalg  # noqa: F401  (loads the OpenBLAS that JAX's CPU LAPACK calls)
import threadpoolctl

from fusionjax import testbed
from fusionjax.demo import run_merging_suite
from tests._testing import SEEDS

# One BLAS/LAPACK thread per process (NumPy's and SciPy's OpenBLAS; JAX's CPU SVD, eigh
# and solves call the latter): the suite runs one pytest-xdist worker per core, and
# threads of one worker spinning on the other's core only cost time (the SVD-heavy rows
# of the merging suite run in half the time). NumPy is loaded before this file, so the
# limit is set at run time; the variable covers the notebooks' kernels and subprocesses.
threadpoolctl.threadpool_limits(limits=1, user_api="blas")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# One persistent XLA compilation cache for the session, inherited through the environment
# by the notebooks' kernels and the tests' subprocesses: a notebook that runs the demo's
# functions loads what the in-process tests compiled instead of compiling it again. The
# cache only stores compiled programs; results are the same with or without it. Programs
# that took 0.1 s or more to compile are stored: the merge kernels of a testbed take
# 0.2-0.5 s each, and a notebook kernel that finds the digits worker's loads them
# (notebook 01: 23.9 s -> 17.3 s; at a 0.5 s threshold they were not kept).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="fusionjax-tests-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")),
)


# Session fixtures that train or study models for minutes, by the xdist group that owns
# them. Under ``pytest -n 2 --dist loadgroup`` (the README's command) every test that uses
# one of a group's fixtures runs on the same worker, so each is built once per run, while
# the other worker takes the rest; the testbeds' disk caches are locked per file, so a
# notebook kernel or a worker that needs a testbed being built waits and then reads it.
_HEAVY_FIXTURES = {
    "suite": "digits",
    "language_testbeds": "language",
    "language_log_probs": "language",
    # The knowledge testbed is built on the language testbed: one worker builds both in
    # turn, rather than the other waiting on the language testbed's lock.
    "knowledge_testbeds": "language",
    "knowledge_rows": "language",
    "knowledge_tables": "language",
    "barriers": "alignment",
    "fusions": "alignment",
    "spec_results": "alignment",
    "pleas_results": "alignment",
    "clafusion_results": "alignment",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into nodeid suffixes
def pytest_collection_modifyitems(config, items):
    """Puts each test that uses a heavy session fixture in that fixture's xdist group."""
    for item in items:
        groups = sorted({g for f, g in _HEAVY_FIXTURES.items() if f in item.fixturenames})
        if groups:
            item.add_marker(pytest.mark.xdist_group("+".join(groups)))


@pytest.fixture
def rng():
    """A fresh PRNG key."""
    return jax.random.key(0)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Wraps a function in ``jax.jit`` or leaves it as is."""
    return (lambda f: jax.jit(f)) if request.param else (lambda f: f)


@pytest.fixture(scope="session")
def suite():
    """{seed: {row name: MethodResult}}: every method of the demo on every seed, once per session."""
    out = {}
    for seed in SEEDS:
        tb = testbed.load(seed=seed)
        out[seed] = {r.name: r for r in run_merging_suite(tb)}
    return out


@pytest.fixture(scope="session")
def language_testbeds():
    """``{seed: LanguageTestbed}``: the byte-level LM testbed of every seed, loaded once."""
    from fusionjax.testbed import language

    return {seed: language.load(seed=seed) for seed in SEEDS}


@pytest.fixture(scope="session")
def knowledge_testbeds():
    """``{seed: KnowledgeTestbed}``: BPE and byte teachers of every seed, loaded once."""
    from fusionjax.testbed import knowledge

    return {seed: knowledge.load(seed=seed) for seed in SEEDS}


@pytest.fixture(scope="session")
def knowledge_tables(knowledge_testbeds):
    """``{seed: {model: {corpus: bits per byte}}}``: teachers and base, held out."""
    return {seed: tb.bits_table() for seed, tb in knowledge_testbeds.items()}


@pytest.fixture(scope="session")
def knowledge_rows(knowledge_testbeds):
    """``{seed: [DistillRow]}``: the knowledge-fusion table of every seed (``demo distill``).

    Every student of the table trained once per session (about a minute per seed).
    """
    from fusionjax.demo import _distill

    return {seed: _distill.distillation_rows(tb) for seed, tb in knowledge_testbeds.items()}


@pytest.fixture(scope="session")
def language_log_probs(language_testbeds):
    """``{seed: {corpus: {model: [N, L, V]}}}``: every model's held-out log-probabilities.

    ``general``: strong and base; each domain: strong, base, every expert and that domain's
    fine-tuned strong model. Computed once per session (a few seconds).
    """
    out = {}
    for seed, tb in language_testbeds.items():
        modules = {name: (m, p) for name, m, p in tb.models()}
        wanted = {"general": ["strong", "base"]}
        for d in tb.domains:
            wanted[d] = ["strong", "base", *(f"expert[{e}]" for e in tb.domains), f"strong_ft[{d}]"]
        out[seed] = {
            c: {name: tb.log_probs(*modules[name], tb.heldout[c]) for name in names}
            for c, names in wanted.items()
        }
    return out


@pytest.fixture(scope="session")
def barriers():
    """``{seed: [BarrierResult per width]}`` (MLP pairs, naive / weight / activation matching)."""
    from fusionjax.demo import _alignment

    return _alignment.barrier_study(SEEDS)


@pytest.fixture(scope="session")
def fusions():
    """``{seed: [FusionResult equal widths, FusionResult different widths]}``."""
    from fusionjax.demo import _alignment

    return _alignment.fusion_study(SEEDS)


@pytest.fixture(scope="session")
def pleas_results():
    """``{seed: MergeOutput}``: PLeaS at merged widths 1-2x vs weight matching (16-unit pairs)."""
    from fusionjax.demo import _alignment

    return _alignment.pleas_study(tuple(SEEDS))


@pytest.fixture(scope="session")
def clafusion_results():
    """``{seed: MergeOutput}``: CLAFusion of a deeper and a shallower MLP; OT fusion of three."""
    from fusionjax.demo import _alignment

    return _alignment.clafusion_study(tuple(SEEDS))


@pytest.fixture(scope="session")
def spec_results():
    """``{0: [ResNet result, transformer result]}``: hand vs derived spec, one pair each.

    One seed, shorter-trained models (ResNet 50 steps, transformer 150) and 3 points per
    BatchNorm curve (the demo: 300 steps, 5 points): with equal groups in the same order
    the two specs give the same matching, which is what the test checks; the demo's
    figures over 3 seeds are in the README.
    """
    from fusionjax.demo import _alignment

    return _alignment.spec_study([0], resnet_steps=50, resnet_points=3, transformer_steps=150)
