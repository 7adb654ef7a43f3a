r"""A knowledge-fusion testbed: teachers of different architectures and tokenizers.

The setting of FuseLLM (Wan et al. 2024) and FuseChat, on the byte-level language testbed
(:mod:`fusionjax.testbed.language`, same corpora: general text, ``code`` and ``docs``):

* **BPE teachers**, one per domain, each with its own byte-level BPE tokenizer trained
  with Hugging Face ``tokenizers`` on the first :attr:`KnowledgeConfig.tokenizer_chars`
  characters of the general and its domain's training text (``code``: vocabulary 512,
  ``docs``: 1024; deterministic, trained once per configuration, seed-independent): a
  :class:`fusionjax.zoo.Decoder` over those tokens (``code``: width 96, depth 2;
  ``docs``: width 64, depth 3; context 64 tokens), pretrained on general text, then
  trained on its domain;
* a **byte-level teacher**: the language testbed's *strong* model (width 128, depth 3,
  general text). Of the language testbed's models it is the one that is strong where the
  BPE teachers are not (general text), so each of the three teachers is best on one of
  the three corpora, as FuseLLM's Llama-2 (general), MPT and OpenLLaMA were; its
  fine-tuned copies would duplicate the BPE teachers' domains;
* the **target**: the language testbed's small *base* (width 64, depth 2, bytes), the
  initialisation of every distilled student.

Everything is scored in **bits per byte** on the language testbed's held-out windows of
each corpus (256 windows of 64 bytes, other documents than the training text), so the
tokenizations compare: a byte model's mean NLL of bytes ``1 .. 63`` over :math:`\ln 2`; a
BPE model's summed NLL of the window's tokens after the first (its own tokenization of
the window) over those tokens' bytes, over :math:`\ln 2`.

Measured on seed 0 (Python 3.11.7; held-out bits per byte, 256 windows per corpus;
seeds 1 and 2 pass the same checks in ``tests/testbed/knowledge_test.py``)::

  model        general   code   docs
  bpe[code]      4.429  3.036  4.333
  bpe[docs]      3.779  3.734  3.021
  byte           3.741  3.426  3.510
  base           3.865  3.603  3.686

Each teacher is best on its own corpus (the byte teacher on general text, by 0.04 bits)
and better than the base there. Building one seed's teachers took 64 s on two cores
shared with other jobs (load 6-9; mostly compilation: the domain phases ran in 2-3 s),
the tokenizers 12 s once; a cached load is about a second plus the language testbed's.

What costs time, and what is done about it: training the two BPE teachers (two runs each,
pretraining and domain training, sharing one compiled loop per architecture,
:func:`fusionjax.testbed._language._train`), and once per configuration the tokenizers and
the tokenization of the training streams (cached in a seed-independent file). Models,
tokenizers (their JSON) and timings are cached on disk per seed and locked while built
(:func:`fusionjax.testbed._cache.building`); the language testbed underneath has its own
cache.

Examples:
  >>> from fusionjax.testbed import knowledge
  >>> tb = knowledge.load(seed=0)  # doctest: +SKIP
  >>> print(tb.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import batches
from fusionjax.distill import _bytes
from fusionjax.distill._bytes import ByteTargetsOutput
from fusionjax.distill._bytes import TokenBytes
from fusionjax.distill._types import TopK
from fusionjax.testbed import _cache
from fusionjax.testbed import _corpus
from fusionjax.testbed import _language
from fusionjax.testbed._corpus import DOMAINS
from fusionjax.testbed._language import LanguageConfig
from fusionjax.testbed._language import LanguageTestbed
from fusionjax.zoo import _decoder
from fusionjax.zoo._decoder import Decoder

Params = Any

__all__ = [
    "DOMAINS",
    "KnowledgeConfig",
    "KnowledgeTestbed",
    "Teacher",
    "TokenTargetsOutput",
    "bits_per_byte",
    "bytes_to_unicode",
    "load",
    "window_bits_bytes",
]

_VERSION = "1"
_SOURCES = (_corpus, _decoder, _bytes, _language, sys.modules[__name__])
_LN2 = float(np.log(2.0))
_FORWARDS_KEPT = 4


@dataclasses.dataclass(frozen=True)
class KnowledgeConfig:
    """Hyperparameters of the knowledge testbed; all of them key the on-disk cache.

    Attributes:
      language: The language testbed's config (byte teacher, target base, corpora).
      code_vocab: BPE vocabulary size of the ``code`` teacher.
      docs_vocab: BPE vocabulary size of the ``docs`` teacher.
      tokenizer_chars: Characters of general and of domain training text each tokenizer
        is trained on.
      train_bytes: Bytes of general and of domain training text each teacher trains on
        (the start of each stream, tokenized once).
      code_dim: Width of the ``code`` teacher (MLP ``4 x``).
      code_depth: Its blocks.
      docs_dim: Width of the ``docs`` teacher.
      docs_depth: Its blocks.
      context_length: Teacher context, in tokens.
      general_steps: Pretraining steps of each BPE teacher on general text.
      domain_steps: Its training steps on its domain after that.
      learning_rate: Peak learning rate of both phases.
      batch_size: Windows per step.
      warmup_steps: Linear warm-up of each phase.
    """

    language: LanguageConfig = LanguageConfig()
    code_vocab: int = 512
    docs_vocab: int = 1024
    tokenizer_chars: int = 150_000
    train_bytes: int = 400_000
    code_dim: int = 64
    code_depth: int = 2
    docs_dim: int = 48
    docs_depth: int = 3
    context_length: int = 32
    general_steps: int = 60
    domain_steps: int = 120
    learning_rate: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 10

    def module(self, domain: str) -> Decoder:
        """The BPE teacher :class:`fusionjax.zoo.Decoder` of ``domain``."""
        vocab, dim, depth = {
            "code": (self.code_vocab, self.code_dim, self.code_depth),
            "docs": (self.docs_vocab, self.docs_dim, self.docs_depth),
        }[domain]
        return Decoder(
            vocab_size=vocab,
            dim=dim,
            depth=depth,
            heads=4,
            mlp_width=4 * dim,
            max_length=self.context_length,
        )


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The byte -> character map of byte-level BPE (GPT-2's; ``tokenizers``' ``ByteLevel``).

    Printable Latin-1 bytes map to themselves, the other 68 to ``chr(256 + i)`` in order.

    Returns:
      ``{byte: character}`` for all 256 bytes.
    """
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class Teacher:
    """A BPE teacher: its tokenizer (``tokenizers.Tokenizer``), module and params.

    Attributes:
      domain: The domain it is strong on.
      tokenizer: The trained byte-level BPE ``tokenizers.Tokenizer``.
      vocab: Its vocabulary as bytes (:class:`fusionjax.distill.TokenBytes`).
      module: Its :class:`fusionjax.zoo.Decoder`.
      params: Its params.
    """

    def __init__(self, domain: str, tokenizer_json: str, module: Decoder, params: Params):
        """Wraps a trained teacher (see the class docstring)."""
        from tokenizers import Tokenizer  # noqa: PLC0415 (the testbed's optional dependency)

        self.domain = domain
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.module = module
        self.params = params
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        size = self.tokenizer.get_vocab_size()
        vocab = [b""] * size
        for piece, t in self.tokenizer.get_vocab().items():
            vocab[t] = bytes(inverse[c] for c in piece)
        self._byte_ids = np.asarray(
            [self.tokenizer.token_to_id(bytes_to_unicode()[b]) for b in range(256)], np.int32
        )
        self.vocab: TokenBytes = _bytes.token_bytes(vocab)

    def encode(self, data: bytes | np.ndarray) -> np.ndarray:
        """The teacher's tokens of a byte string, ``[T]`` int32, lossless.

        Valid UTF-8 runs go through the tokenizer; stray bytes (a character cut by a window
        edge) become single-byte tokens. The tokens' bytes concatenate to ``data``.

        Args:
          data: ``bytes`` or a ``[n]`` array of byte values.

        Returns:
          The token ids.
        """
        return self.encode_batch([data])[0]

    def encode_batch(self, texts) -> list[np.ndarray]:
        """:meth:`encode` of every byte string of ``texts`` (one tokenizer batch call)."""
        pieces, plan = [], []
        for data in texts:
            data = bytes(np.asarray(data, np.uint8)) if not isinstance(data, bytes) else data
            row = []
            for part in re.split("([\udc80-\udcff]+)", data.decode("utf-8", "surrogateescape")):
                if not part:
                    continue
                if "\udc80" <= part[0] <= "\udcff":
                    row.append(self._byte_ids[[ord(c) - 0xDC00 for c in part]])
                else:
                    row.append(len(pieces))
                    pieces.append(part)
            plan.append(row)
        encoded = self.tokenizer.encode_batch(pieces, add_special_tokens=False)
        out = []
        for row in plan:
            parts = [np.asarray(encoded[p].ids, np.int32) if isinstance(p, int) else p for p in row]
            out.append(np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32))
        return out

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of every byte window, ``[N, C]`` int32 padded with ``-1``.

        A window's tokens past the teacher's context ``C`` are cut (the bytes they hold
        get no teacher prediction).

        Args:
          windows: ``[N, L]`` byte values.

        Returns:
          ``[N, C]`` token ids.
        """
        windows = np.asarray(windows)
        rows = self.encode_batch(list(windows))
        out = np.full((windows.shape[0], self.module.max_length), -1, np.int32)
        for r, t in enumerate(rows):
            t = t[: out.shape[1]]
            out[r, : len(t)] = t
        return out


class TokenTargetsOutput(NamedTuple):
    r"""A teacher's head over its *own* vocabulary at every byte position (vocabulary-free losses).

    Attributes:
      targets: :class:`fusionjax.distill.TopK` ``[N, L, k]``: the ``k`` largest
        log-probabilities (temperature 1, normalised over the whole vocabulary) and their
        token ids, most likely first.
      standardized: ``[N, L, k]`` TopK of :math:`\log\mathrm{softmax}(\tilde z/\tau)`,
        :math:`\tilde z` the z-scored logits (InfiFusion's standardisation, statistics
        over the whole vocabulary), normalised over the whole vocabulary.
      where: ``[N, L]`` bool, ``True`` where row ``j`` holds a distribution.
    """

    targets: TopK
    standardized: TopK
    where: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class KnowledgeTestbed:
    """BPE teachers per domain, the byte-level strong teacher and the byte-level target base.

    Attributes:
      config: The :class:`KnowledgeConfig` it was built with.
      seed: The seed.
      domains: ``("code", "docs")``.
      language: The :class:`fusionjax.testbed.language.LanguageTestbed` of the same seed.
      teachers: ``{domain: Teacher}``, the BPE teachers.
      heldout: ``{corpus: [N, 64] int32}`` held-out byte windows (the language testbed's).
      build_seconds: ``{stage: seconds}`` of the build.
    """

    config: KnowledgeConfig
    seed: int
    domains: tuple[str, ...]
    language: LanguageTestbed
    teachers: dict[str, Teacher]
    heldout: dict[str, np.ndarray]
    build_seconds: dict[str, float]
    # The last few teacher forwards, {(name, windows' digest): (tokens, log-probs)}: the
    # byte targets, the per-window bits and the token heads of one distillation set read
    # the same forward, which is computed once.
    _forwards: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def _forward(self, name: str, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [N, T], log-probs [N, T, V])`` of model ``name`` on byte ``windows``."""
        windows = np.ascontiguousarray(windows, np.int32)
        key = (name, windows.shape, hashlib.sha1(windows.tobytes()).hexdigest())
        if key in self._forwards:
            return self._forwards[key]
        if name in ("byte", "base"):
            module, params = {
                "byte": (self.language.strong_module, self.language.strong),
                "base": (self.language.small_module, self.language.base),
            }[name]
            tokens = windows
            lp = _language.log_probs(module, params, windows)
        else:
            teacher = self.teachers[_domain_of(name)]
            tokens = teacher.encode_windows(windows)
            lp = _language.log_probs(teacher.module, teacher.params, np.maximum(tokens, 0))
        while len(self._forwards) >= _FORWARDS_KEPT:
            self._forwards.pop(next(iter(self._forwards)))
        self._forwards[key] = (tokens, lp)
        return tokens, lp

    @property
    def target_module(self) -> Decoder:
        """The byte-level target's module (the language testbed's small model)."""
        return self.language.small_module

    @property
    def base(self) -> Params:
        """The target's initialisation: the language testbed's small base."""
        return self.language.base

    def teacher_names(self) -> list[str]:
        """``["bpe[code]", "bpe[docs]", "byte"]``."""
        return [f"bpe[{d}]" for d in self.domains] + ["byte"]

    def train_windows(self, count: int, *, seed: int | None = None) -> dict[str, np.ndarray]:
        """``count`` random byte windows of each training corpus, ``{corpus: [count, 64]}``.

        Args:
          count: Windows per corpus.
          seed: Seed of the window starts; default: the testbed's seed.

        Returns:
          ``{"general" | domain: [count, L] int32}``, ``L`` the target's context length.
        """
        corpus = _corpus.load_corpus(self.config.language.corpus)
        length = self.config.language.context_length
        rng = np.random.default_rng(self.seed if seed is None else seed)
        out = {}
        for name in ("general",) + self.domains:
            stream = corpus.train[name]
            starts = rng.integers(0, len(stream) - length, count)
            out[name] = np.stack([stream[s : s + length] for s in starts]).astype(np.int32)
        return out

    def byte_targets(
        self, name: str, windows: np.ndarray, *, k: int = 8, token_k: int | None = None
    ) -> ByteTargetsOutput:
        """A teacher's next-byte top-``k`` distributions at every byte of every window.

        BPE teachers tokenize each window alone, keep their top ``token_k`` next tokens
        (default: the whole vocabulary, which the conversion handles in linear time and
        which gives much better targets than a cut),
        convert them with :func:`fusionjax.distill.next_byte_distributions` and keep the
        ``k`` most likely bytes (not renormalised); the byte teacher's top ``k`` bytes are
        taken directly.

        Args:
          name: ``"bpe[code]"``, ``"bpe[docs]"`` or ``"byte"``.
          windows: ``[N, L]`` byte windows.
          k: Slots kept per position.
          token_k: Token slots the conversion sums over (BPE teachers); ``None``: all.

        Returns:
          ``ByteTargetsOutput(TopK [N, L, k], where [N, L])``; row ``j`` predicts byte
          ``j + 1`` (the last row of each window is masked).
        """
        windows = np.asarray(windows, np.int32)
        n, length = windows.shape
        if name == "byte":
            _, lp = self._forward(name, windows)
            vals, ids = _top_k(jnp.asarray(lp), k)
            where = np.ones((n, length), bool)
            where[:, -1] = False
            return ByteTargetsOutput(TopK(np.asarray(ids, np.int32), np.asarray(vals)), where)
        teacher = self.teachers[_domain_of(name)]
        vocab_size = teacher.module.vocab_size
        token_k = vocab_size if token_k is None else min(max(k, token_k), vocab_size)
        if token_k == vocab_size:  # the whole distribution: no sort needed (top_k is one)
            tokens, vals = self._forward(name, windows)
            ids = np.broadcast_to(np.arange(vocab_size, dtype=np.int32), vals.shape)
        else:
            tokens = teacher.encode_windows(windows)
            ids, vals = _teacher_top_k(teacher.module, teacher.params, tokens, token_k)
        out = _bytes.next_byte_distributions(
            TopK(ids, vals), tokens, teacher.vocab, num_bytes=length
        )
        top = TopK(out.targets.ids[..., :k], out.targets.log_probs[..., :k])
        return ByteTargetsOutput(top, out.where)

    def token_targets(
        self, name: str, windows: np.ndarray, *, k: int = 64, temperature: float = 1.0
    ) -> TokenTargetsOutput:
        r"""A teacher's top-``k`` next-token distribution over its own vocabulary, per byte.

        What the vocabulary-free losses (ULD, InfiFusion, InfiGFusion) need: no vocabulary
        mapping, only positions. Row ``j`` (the student predicting byte ``j + 1``) holds
        the teacher's distribution at the token row that predicts the token holding byte
        ``j + 1`` — the row :func:`fusionjax.distill.next_byte_distributions` converts —
        so every byte of a token shares its row. The byte teacher's row ``j`` is its own
        next-byte distribution. Rows are masked (``where``) as in :meth:`byte_targets`:
        bytes of a window's first token (nothing predicts it), bytes past the teacher's
        context, and the last row.

        Both heads are exact (:func:`fusionjax.distill.uld_teacher_targets`: computed from
        the full logits, normalised over the whole vocabulary); the only cut is ``k``.

        Args:
          name: ``"bpe[code]"``, ``"bpe[docs]"`` or ``"byte"``.
          windows: ``[N, L]`` byte windows.
          k: Slots kept per position (at most the teacher's vocabulary size).
          temperature: :math:`\tau` of the standardised head.

        Returns:
          A :class:`TokenTargetsOutput` of ``[N, L, k]`` heads (``[N, L]`` mask).
        """
        windows = np.asarray(windows, np.int32)
        n, length = windows.shape
        if name == "byte":
            _, lp = self._forward(name, windows)
            rows = np.broadcast_to(np.arange(length), (n, length))
            where = np.ones((n, length), bool)
            where[:, -1] = False
        else:
            teacher = self.teachers[_domain_of(name)]
            tokens, lp = self._forward(name, windows)
            rows, where = _byte_rows(tokens, teacher.vocab.lengths, length)
        heads = []
        for h in _heads(np.asarray(lp), min(k, lp.shape[-1]), float(temperature)):
            ids = np.take_along_axis(np.asarray(h.ids), rows[..., None], axis=1)
            vals = np.take_along_axis(np.asarray(h.log_probs), rows[..., None], axis=1)
            heads.append(TopK(np.where(where[..., None], ids, -1).astype(np.int32),
                              np.where(where[..., None], vals, -np.inf).astype(np.float32)))
        return TokenTargetsOutput(heads[0], heads[1], where)

    def distillation_data(self, count: int = 256, *, k: int = 8) -> dict[str, np.ndarray]:
        """The distillation set: training windows with every teacher's byte targets.

        ``count`` windows of each training corpus (general and every domain), and for each
        teacher ``m`` (order :meth:`teacher_names`) its top-``k`` next-byte distributions
        (:meth:`byte_targets`) and its bits per byte on each window (:meth:`window_bits`:
        the per-sequence cross-entropy FuseLLM's MinCE and AvgCE weigh teachers by).

        Args:
          count: Windows per corpus.
          k: Byte slots per position.

        Returns:
          ``{"windows": [N, L] int32, "ids": [N, M, L, k] int32, "log_probs": [N, M, L,
          k] float32, "where": [N, M, L] bool, "bits": [N, M] float32, "corpus": [N]
          int32}`` with ``N = count * (1 + len(domains))``, ``corpus`` indexing
          ``("general",) + domains``; the example axis leads, as
          :func:`fusionjax.distill.distill` samples it.
        """
        parts = self.train_windows(count)
        windows = np.concatenate(list(parts.values()))
        names = self.teacher_names()
        targets = [self.byte_targets(n, windows, k=k) for n in names]
        bits = np.stack([self.window_bits(n, windows) for n in names], 1)
        return {
            "windows": windows,
            "ids": np.stack([t.targets.ids for t in targets], 1).astype(np.int32),
            "log_probs": np.stack([t.targets.log_probs for t in targets], 1).astype(np.float32),
            "where": np.stack([t.where for t in targets], 1),
            "bits": bits.astype(np.float32),
            "corpus": np.repeat(np.arange(len(parts), dtype=np.int32), count),
        }

    def evaluate(self, params: Params, *, windows: int | None = None) -> dict[str, float]:
        """Held-out bits per byte of target ``params`` on every corpus.

        Args:
          params: Params of :attr:`target_module`.
          windows: Use the first ``windows`` held-out windows of each corpus (all if
            ``None``).

        Returns:
          ``{corpus: bits per byte}``.
        """
        out = {}
        for c, w in self.heldout.items():
            w = w if windows is None else w[:windows]
            out[c] = float(np.mean(window_bits_bytes(self.target_module, params, w)))
        return out

    def window_bits(self, name: str, windows: np.ndarray) -> np.ndarray:
        """Bits per byte of each window under a model, ``[N]`` float64.

        Args:
          name: A teacher name, ``"base"`` (the target's initialisation).
          windows: ``[N, L]`` byte windows.

        Returns:
          Per-window bits per byte (see the module docstring for the BPE definition).
        """
        windows = np.asarray(windows, np.int32)
        tokens, lp = self._forward(name, windows)
        if name in ("byte", "base"):
            gold = np.take_along_axis(lp[:, :-1], windows[:, 1:, None].astype(np.int64), -1)
            return -np.mean(gold[..., 0], -1, dtype=np.float64) / _LN2
        teacher = self.teachers[_domain_of(name)]
        nxt = np.maximum(tokens[:, 1:], 0)
        token_nll = -np.take_along_axis(lp[:, :-1], nxt[..., None], -1)[..., 0]
        counted = tokens[:, 1:] >= 0
        nbytes = np.where(counted, teacher.vocab.lengths[nxt], 0).sum(-1)
        return np.where(counted, token_nll, 0.0).sum(-1, dtype=np.float64) / nbytes / _LN2

    def bits_table(self) -> dict[str, dict[str, float]]:
        """``{model: {corpus: bits per byte}}`` of the teachers and the base, held out."""
        return {name: dict(row) for name, row in self._bits_table.items()}

    @functools.cached_property
    def _bits_table(self) -> dict[str, dict[str, float]]:
        # Computed once per testbed object (the fixtures, the table and the demo all ask).
        names = self.teacher_names() + ["base"]
        return {
            name: {c: float(np.mean(self.window_bits(name, w))) for c, w in self.heldout.items()}
            for name in names
        }

    def describe(self) -> str:
        """A text table of held-out bits per byte (rows: models; columns: corpora).

        Returns:
          The table, with the build time.
        """
        table = self.bits_table()
        corpora = list(self.heldout)
        lines = [f"{'seed ' + str(self.seed):<12}" + "".join(f"{c:>9}" for c in corpora)]
        for name, row in table.items():
            lines.append(f"{name:<12}" + "".join(f"{row[c]:>9.3f}" for c in corpora))
        total = sum(self.build_seconds.values())
        lines.append(f"(held-out bits per byte; built in {total:.1f} s)")
        return "\n".join(lines)


def _byte_rows(tokens: np.ndarray, lengths: np.ndarray, num_bytes: int):
    """Teacher rows ``[N, n]`` and mask for student rows ``j`` (predicting byte ``j + 1``).

    Byte ``m`` is held by token ``h`` (``starts[h] <= m < ends[h]``), predicted by the
    teacher's row ``h - 1``; bytes of the first token and past the last are masked.
    """
    valid = tokens >= 0
    ends = np.cumsum(np.where(valid, lengths[np.maximum(tokens, 0)], 0), axis=-1)
    m = np.arange(num_bytes)
    holder = np.sum(ends[:, None, :] <= m[None, :, None], axis=-1)  # tokens ending at or before m
    held = (m[None, :] < ends[:, -1:]) & (holder >= 1)
    src = np.maximum(holder - 1, 0)
    rows = np.concatenate([src[:, 1:], np.zeros_like(src[:, :1])], 1)
    where = np.concatenate([held[:, 1:], np.zeros_like(held[:, :1])], 1)
    return rows, where


def _domain_of(name: str) -> str:
    match = re.fullmatch(r"bpe\[(\w+)\]", name)
    if not match or match.group(1) not in DOMAINS:
        raise ValueError(f"name must be 'byte' or one of bpe[{'|'.join(DOMAINS)}], got {name!r}")
    return match.group(1)


def bits_per_byte(log_probs: np.ndarray, windows: np.ndarray) -> float:
    r"""Mean bits per byte of byte ``windows[:, 1:]`` under a byte model's ``log_probs``.

    Args:
      log_probs: ``[N, L, 256]`` log-probabilities (row ``j`` predicts byte ``j + 1``).
      windows: ``[N, L]`` bytes.

    Returns:
      :func:`fusionjax.testbed.language.nll` over :math:`\ln 2`.
    """
    return _language.nll(log_probs, windows) / _LN2


def window_bits_bytes(module: Decoder, params: Params, windows: np.ndarray) -> np.ndarray:
    """Per-window bits per byte of a byte-level model (bytes ``1 .. L-1``), ``[N]``.

    Args:
      module: A byte-level :class:`fusionjax.zoo.Decoder`.
      params: Its params.
      windows: ``[N, L]`` bytes.

    Returns:
      ``[N]`` float64.
    """
    lp = _language.log_probs(module, params, windows)
    gold = np.take_along_axis(lp[:, :-1], windows[:, 1:, None].astype(np.int64), -1)[..., 0]
    return -np.mean(gold, -1, dtype=np.float64) / _LN2


def _heads(lp: np.ndarray, k: int, temperature: float) -> tuple[TopK, TopK]:
    r"""The two heads of :meth:`KnowledgeTestbed.token_targets` from log-probs ``[..., V]``.

    Host NumPy (XLA's CPU sort and ``top_k`` were the slow part): one ``argpartition``
    finds the ``k`` largest, which are also the largest standardised ones (the z-score
    and the temperature are increasing maps), whose log-probabilities follow from the
    per-position mean, standard deviation and log-normaliser of
    :math:`\tilde z / \tau` over the whole vocabulary — the values
    :func:`fusionjax.distill.uld_teacher_targets` computes.
    """
    lp = lp.astype(np.float32)
    if k < lp.shape[-1]:
        part = np.argpartition(-lp, k - 1, axis=-1)[..., :k]
        vals = np.take_along_axis(lp, part, axis=-1)
    else:
        part, vals = np.broadcast_to(np.arange(k), lp.shape), lp
    order = np.argsort(-vals, axis=-1)
    ids = np.take_along_axis(part, order, axis=-1).astype(np.int32)
    vals = np.take_along_axis(vals, order, axis=-1)
    mean = lp.mean(-1, keepdims=True)
    std = lp.std(-1, keepdims=True)
    scale = np.where(std > 0, std, 1.0) * temperature
    top = vals[..., :1]  # the largest standardised logit is the largest log-prob's
    lse = (top - mean) / scale + np.log(np.sum(np.exp((lp - top) / scale), -1, keepdims=True))
    svals = (vals - mean) / scale - lse
    return TopK(ids, vals), TopK(ids, svals.astype(np.float32))


@functools.partial(jax.jit, static_argnums=1)
def _top_k(lp, k):
    return jax.lax.top_k(lp, k)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _top_k_logits(module, params, tokens, k):
    lp = jax.nn.log_softmax(module.apply({"params": params}, tokens), axis=-1)
    vals, ids = jax.lax.top_k(lp, k)
    return ids.astype(jnp.int32), vals


def _teacher_top_k(module, params, tokens, k, batch_size=256):
    tokens = np.maximum(np.asarray(tokens, np.int32), 0)
    ids, vals = [], []
    for batch, mask in batches.padded_batches(tokens, tokens.shape[0], batch_size):
        i, v = _top_k_logits(module, params, batch, k)
        n = int(np.sum(np.asarray(mask)))
        ids.append(np.asarray(i)[:n])
        vals.append(np.asarray(v)[:n])
    return np.concatenate(ids), np.concatenate(vals)


def _train_tokenizer(text: str, vocab_size: int) -> str:
    from tokenizers import Tokenizer  # noqa: PLC0415
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok.to_str()


def _tokenizers_path(config: KnowledgeConfig) -> str:
    spec = {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if "vocab" in k}
        | {"tokenizer_chars": config.tokenizer_chars, "corpus": dataclasses.asdict(
            config.language.corpus)},
        "corpus": _corpus.fingerprint(config.language.corpus),
        "tokenizers": _tokenizers_version(),
    }
    return _cache.path("knowledge-tokens", _VERSION, spec, _SOURCES, 0)


def _tokenizers_version() -> str:
    import tokenizers  # noqa: PLC0415

    return tokenizers.__version__


def _tokenized(config: KnowledgeConfig, cache: bool, timings: dict):
    """``{domain: (tokenizer_json, {"general": tokens, domain: tokens})}``, cached."""
    def restore(path):
        with np.load(path) as data:
            return {
                d: (str(data[f"{d}/tokenizer"]), {
                    c: np.asarray(data[f"{d}/{c}"]) for c in ("general", d)
                })
                for d in DOMAINS
            }

    def build():
        t0 = time.perf_counter()
        corpus = _corpus.load_corpus(config.language.corpus)
        out = {}
        sizes = {"code": config.code_vocab, "docs": config.docs_vocab}
        for d in DOMAINS:
            texts = {c: corpus.train[c].tobytes().decode("utf-8", "surrogateescape")
                     for c in ("general", d)}
            sample = "".join(texts[c][: config.tokenizer_chars] for c in texts)
            sample = sample.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            tok_json = _train_tokenizer(sample, sizes[d])
            teacher = Teacher(d, tok_json, config.module(d), None)
            streams = {}
            for c in ("general", d):
                data = corpus.train[c][: config.train_bytes].tobytes()
                pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
                streams[c] = np.concatenate(teacher.encode_batch(pieces)).astype(np.int16)
            out[d] = (tok_json, streams)
        timings["tokenizers"] = time.perf_counter() - t0
        return out

    def save(path, out):
        arrays = {}
        for d, (tok_json, streams) in out.items():
            arrays[f"{d}/tokenizer"] = np.asarray(tok_json)
            arrays.update({f"{d}/{c}": st for c, st in streams.items()})
        _cache.save(path, arrays)

    out, _ = _cache.load_or_build(
        _tokenizers_path(config), cache=cache, restore=restore, build=build, save=save
    )
    return out


def _build(config: KnowledgeConfig, seed: int, tokenized, timings):
    keys = iter(jax.random.split(jax.random.key(1000 + seed), 8))
    params = {}
    for d in DOMAINS:
        module = config.module(d)
        streams = tokenized[d][1]
        tokens = jnp.asarray(np.concatenate([streams["general"], streams[d]]).astype(np.int32))
        n_general = len(streams["general"])
        spans = {"general": (0, n_general), d: (n_general, len(streams[d]))}
        dummy = jnp.zeros((1, config.context_length), jnp.int32)
        p = module.init(next(keys), dummy)["params"]
        for phase, steps in (("general", config.general_steps), (d, config.domain_steps)):
            t0 = time.perf_counter()
            p, _ = _language._train(
                module,
                p,
                tokens,
                spans[phase],
                steps=steps,
                learning_rate=config.learning_rate,
                warmup=config.warmup_steps,
                batch_size=config.batch_size,
                key=next(keys),
            )
            p = jax.block_until_ready(p)
            timings[f"bpe[{d}]/{phase}"] = time.perf_counter() - t0
        params[d] = p
    return params


def _cache_path(config: KnowledgeConfig, seed: int) -> str:
    spec = {
        "config": dataclasses.asdict(config),
        "corpus": _corpus.fingerprint(config.language.corpus),
        "tokenizers": _tokenizers_version(),
    }
    return _cache.path("knowledge", _VERSION, spec, _SOURCES, seed)


def _save(path, params, timings):
    arrays = {}
    for d, tree in params.items():
        arrays.update({f"{d}/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(tree))})
    arrays["timings"] = np.asarray(json.dumps(timings))
    _cache.save(path, arrays)


def _restore(path, config):
    dummy = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    out = {}
    with np.load(path) as data:
        for d in DOMAINS:
            shapes = jax.eval_shape(config.module(d).init, jax.random.key(0), dummy)["params"]
            leaves, treedef = jax.tree.flatten(shapes)
            arrays = [jnp.asarray(data[f"{d}/{i}"]) for i in range(len(leaves))]
            for a, s in zip(arrays, leaves, strict=True):
                if a.shape != s.shape or a.dtype != s.dtype:
                    raise ValueError(f"{path}: {d} is {a.shape} {a.dtype}, not {s.shape}")
            out[d] = jax.tree.unflatten(treedef, arrays)
        timings = json.loads(str(data["timings"]))
    return out, timings


def load(
    seed: int = 0,
    *,
    cache: bool = True,
    config: KnowledgeConfig | None = None,
) -> KnowledgeTestbed:
    """Builds the knowledge testbed for ``seed``, or reads it from the on-disk cache.

    Loads (or builds) the language testbed of the same seed, the tokenizers (once per
    configuration) and trains the two BPE teachers.

    Args:
      seed: Seed of the teachers' initialisation and batches (and of the language testbed).
      cache: Read from and write to ``$FUSIONJAX_CACHE`` (see
        :func:`fusionjax.testbed.language.load`).
      config: Hyperparameters; :class:`KnowledgeConfig` defaults if ``None``.

    Returns:
      A :class:`KnowledgeTestbed`.

    Raises:
      TypeError: if ``config`` is not a :class:`KnowledgeConfig`.
    """
    config = KnowledgeConfig() if config is None else config
    if not isinstance(config, KnowledgeConfig):
        raise TypeError(f"config must be a KnowledgeConfig, got {type(config).__name__}")
    language = _language.load(seed, cache=cache, config=config.language)
    timings: dict[str, float] = {}
    tokenized = _tokenized(config, cache, timings)
    path = _cache_path(config, seed)
    (params, timings), _ = _cache.load_or_build(
        path,
        cache=cache,
        restore=lambda f: _restore(f, config),
        build=lambda: (_build(config, seed, tokenized, timings), timings),
        save=lambda f, built: _save(f, *built),
    )
    teachers = {
        d: Teacher(d, tokenized[d][0], config.module(d), params[d]) for d in DOMAINS
    }
    return KnowledgeTestbed(
        config=config,
        seed=seed,
        domains=DOMAINS,
        language=language,
        teachers=teachers,
        heldout=dict(language.heldout),
        build_seconds=timings,
    )
