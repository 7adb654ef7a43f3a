r"""Byte-level text corpora from what ships with Python: stdlib source and pydoc topics.

Nothing is downloaded. Three kinds of text are cut out of the interpreter's own files:

* **code** (a domain): the standard library's top-level modules (``Lib/*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, sorted by name) with every comment and docstring
  removed (:mod:`tokenize` and :mod:`ast`), and runs of blank lines collapsed;
* **docs** (a domain): the English reference documentation of :mod:`pydoc_data.topics`
  (reStructuredText rendered as text: prose, grammar productions, indented examples),
  one document per topic;
* **notes** (the bulk of the general corpus): those same modules' docstrings and
  comments, English prose in another register (short, imperative, inline).

The *general* corpus is notes with a small share of code and docs mixed in
(:attr:`CorpusConfig.domain_share` each), as web-scale pretraining holds a little code.

Held-out splits are by document, never by window: a module (its code and its notes)
or a topic is held out when the first 8 bytes of the SHA-256 of its name, mod 100, fall
below ``100 * heldout_fraction``. A file's split thus depends on its name only, not on
which other files a Python version ships, and every split is the same on every machine
with the same Python minor version (and exists on any Python 3.10+, with other figures).

Tokens are bytes (UTF-8), vocabulary 256; :func:`encode` and :func:`decode` convert.
Documents are joined by a blank line.

What costs time, and what is done about it: cutting the corpus parses and tokenizes every
module (about 7 s); :func:`load_corpus` keeps the result in memory per process and on disk
in the testbeds' cache folder, keyed by its configuration, this module's source and
:func:`fingerprint` (the Python version, the modules' names and sizes, the topics), so the
other processes of a run (test workers, notebook kernels, the CLI) read it in milliseconds.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import io
import os
import sys
import sysconfig
import tokenize

import numpy as np

from fusionjax.testbed import _cache

VOCAB_SIZE = 256
_VERSION = "1"  # the corpus file's format
DOMAINS = ("code", "docs")
_SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """How the corpora are cut and mixed.

    Attributes:
      heldout_fraction: Fraction of modules and of topics held out (by name hash).
      domain_share: Share of the general corpus taken by each domain's training text
        (the rest is notes).
      max_file_bytes: Modules larger than this (source bytes) are skipped, so no single
        file dominates a corpus.
    """

    heldout_fraction: float = 0.2
    domain_share: float = 0.05
    max_file_bytes: int = 200_000


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and held-out token streams (``uint8``, 1-D) per corpus.

    Attributes:
      train: ``{"general": ..., "code": ..., "docs": ...}`` training streams.
      heldout: The same keys, held-out streams (other documents).
      files: ``(train, heldout)`` module names.
      topics: ``(train, heldout)`` pydoc topic names.
    """

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    files: tuple[tuple[str, ...], tuple[str, ...]]
    topics: tuple[tuple[str, ...], tuple[str, ...]]


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as ``[n]`` int32 tokens in ``0 .. 255``.

    Args:
      text: Any string.

    Returns:
      The tokens.

    Examples:
      >>> encode("hé").tolist()
      [104, 195, 169]
    """
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """The text of byte tokens (invalid UTF-8 becomes U+FFFD).

    Args:
      tokens: ``[n]`` integers in ``0 .. 255`` (any array-like).

    Returns:
      The decoded string.

    Examples:
      >>> decode(encode("def f(x):"))
      'def f(x):'
    """
    return np.asarray(tokens).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def is_heldout(name: str, fraction: float) -> bool:
    """Whether document ``name`` is held out (a hash of its name, see the module docstring).

    Args:
      name: A module file name (``"abc.py"``) or a topic name.
      fraction: Fraction held out, in ``[0, 1]``.

    Returns:
      ``True`` for held-out documents.
    """
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
    return bucket < round(100 * fraction)


def stdlib_files(max_file_bytes: int) -> list[str]:
    """Sorted names of the stdlib's top-level ``*.py`` modules of at most ``max_file_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    names = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".py") and os.path.isfile(path):
            if os.path.getsize(path) <= max_file_bytes:
                names.append(name)
    return names


def split_source(source: str) -> tuple[str, str]:
    """``(code, notes)`` of Python source: code without comments and docstrings, and those.

    Docstrings are the first string statement of a module, class or function
    (:func:`inspect.cleandoc` ed); comments lose their ``#``. Raises ``SyntaxError``
    (or ``tokenize.TokenError``) if the source does not parse.

    Args:
      source: A module's text.

    Returns:
      The two strings.
    """
    tree = ast.parse(source)
    drop_lines = set()
    notes = []
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        ) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                notes.append((first.lineno, inspect.cleandoc(first.value.value)))
                drop_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = source.splitlines()
    cut = {}  # line number -> column where a comment starts
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0]] = tok.start[1]
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith("!"):
                notes.append((tok.start[0], text))
    code = []
    for i, line in enumerate(lines, start=1):
        if i in drop_lines:
            continue
        if i in cut:
            line = line[: cut[i]].rstrip()
            if not line.strip():
                continue
        if not line.strip() and (not code or not code[-1].strip()):
            continue
        code.append(line.rstrip())
    notes.sort(key=lambda n: n[0])
    return "\n".join(code).strip("\n"), "\n".join(n[1] for n in notes)


def _join(texts) -> np.ndarray:
    data = _SEPARATOR.join(t for t in texts if t).encode("utf-8")
    return np.frombuffer(data, np.uint8).copy()


def _mix(notes: np.ndarray, domains: list[np.ndarray], share: float, rng) -> np.ndarray:
    """General stream: notes plus ``share`` (of the total) of each domain's stream.

    The streams are cut into 1 KiB chunks, taken in a seeded random order, and the chosen
    chunks interleaved at random, so every window of the general stream is mostly one kind.
    """
    chunk = 1024
    pieces = [notes[i : i + chunk] for i in range(0, len(notes), chunk)]
    total = len(notes) / max(1e-9, 1.0 - share * len(domains))
    for stream in domains:
        want = int(share * total)
        domain_pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
        order = rng.permutation(len(domain_pieces))
        taken, size = [], 0
        for j in order:
            if size >= want:
                break
            taken.append(domain_pieces[j])
            size += len(domain_pieces[j])
        pieces += taken
    order = rng.permutation(len(pieces))
    return np.concatenate([pieces[j] for j in order]) if pieces else np.zeros(0, np.uint8)


def fingerprint(config: CorpusConfig) -> list:
    """What the corpus depends on: the Python version and the stdlib files' names and sizes.

    Args:
      config: A :class:`CorpusConfig` (its ``max_file_bytes`` picks the files).

    Returns:
      A JSON-serialisable list (part of the on-disk cache keys of the corpus and the
      testbeds built on it).
    """
    import pydoc_data.topics  # noqa: PLC0415

    root = sysconfig.get_paths()["stdlib"]
    files = [(n, os.path.getsize(os.path.join(root, n))) for n in stdlib_files(
        config.max_file_bytes
    )]
    topics = sorted((k, len(v)) for k, v in pydoc_data.topics.topics.items())
    return [list(sys.version_info[:3]), files, topics]


def _file(config: CorpusConfig) -> str:
    spec = {"config": dataclasses.asdict(config), "corpus": fingerprint(config)}
    return _cache.path("corpus", _VERSION, spec, [sys.modules[__name__]], 0)


def _save(file: str, corpus: Corpus) -> None:
    arrays = {f"{split}/{k}": v for split in ("train", "heldout")
              for k, v in getattr(corpus, split).items()}
    for i, split in enumerate(("train", "heldout")):
        arrays[f"files/{split}"] = np.asarray(corpus.files[i], dtype=str)
        arrays[f"topics/{split}"] = np.asarray(corpus.topics[i], dtype=str)
    _cache.save(file, arrays)


def _restore(file: str) -> Corpus:
    with np.load(file, allow_pickle=False) as z:
        streams = {
            split: {k: z[f"{split}/{k}"] for k in ("general", *DOMAINS)}
            for split in ("train", "heldout")
        }
        names = {
            what: tuple(tuple(str(n) for n in z[f"{what}/{split}"])
                        for split in ("train", "heldout"))
            for what in ("files", "topics")
        }
    return Corpus(streams["train"], streams["heldout"], names["files"], names["topics"])


@functools.lru_cache(maxsize=4)
def load_corpus(config: CorpusConfig = CorpusConfig(), *, cache: bool = True) -> Corpus:
    """Reads the stdlib and pydoc topics and cuts the train and held-out streams.

    Deterministic in ``config`` and the Python installation (a fixed mixing seed); cached
    per process, and on disk (see the module docstring).

    Args:
      config: A :class:`CorpusConfig`.
      cache: Read and write the on-disk cache (``False``: always cut anew).

    Returns:
      A :class:`Corpus`.

    Raises:
      RuntimeError: if too little text is found (an installation without sources).
    """
    built, _ = _cache.load_or_build(
        _file(config), cache=cache, restore=_restore, build=lambda: _cut(config),
        save=_save, desc="corpus",
    )
    return built


def _cut(config: CorpusConfig) -> Corpus:
    """Builds the corpus (:func:`load_corpus` without its caches)."""
    import pydoc_data.topics  # noqa: PLC0415 (a 0.5 MB module, read on demand)

    root = sysconfig.get_paths()["stdlib"]
    parts = {s: {"code": [], "notes": [], "docs": [], "files": [], "topics": []} for s in "th"}
    for name in stdlib_files(config.max_file_bytes):
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                code, notes = split_source(f.read())
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
        part = parts["h" if is_heldout(name, config.heldout_fraction) else "t"]
        part["code"].append(code)
        part["notes"].append(notes)
        part["files"].append(name)
    topics = pydoc_data.topics.topics
    for name in sorted(topics):
        part = parts["h" if is_heldout(name, config.heldout_fraction) else "t"]
        part["docs"].append(topics[name].strip())
        part["topics"].append(name)
    streams = {}
    for split, part in parts.items():
        code, docs, notes = _join(part["code"]), _join(part["docs"]), _join(part["notes"])
        rng = np.random.default_rng(0 if split == "t" else 1)
        general = _mix(notes, [code, docs], config.domain_share, rng)
        streams[split] = {"general": general, "code": code, "docs": docs}
        if min(len(s) for s in streams[split].values()) < 16_384:
            sizes = {k: len(v) for k, v in streams[split].items()}
            raise RuntimeError(f"Too little text in the stdlib at {root}: {sizes} bytes.")
    return Corpus(
        train=streams["t"],
        heldout=streams["h"],
        files=(tuple(parts["t"]["files"]), tuple(parts["h"]["files"])),
        topics=(tuple(parts["t"]["topics"]), tuple(parts["h"]["topics"])),
    )


def windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping windows of ``length`` tokens of a stream.

    Args:
      stream: A 1-D token stream.
      length: Tokens per window.
      count: Windows wanted; fewer are returned if the stream is too short.

    Returns:
      ``[n, length]`` int32 tokens, ``n = min(count, len(stream) // length)``.
    """
    n = min(count, len(stream) // length)
    stride = len(stream) // max(n, 1)
    starts = np.arange(n) * stride
    return np.stack([stream[s : s + length] for s in starts]).astype(np.int32).reshape(n, length)
