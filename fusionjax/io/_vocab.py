r"""Vocabulary alignment: merge LLMs whose tokenizers (and so embedding rows) differ.

Row :math:`i` of a language model's input embedding (and of its output head, in torch's
``[vocab, d]`` layout) belongs to token :math:`i` of *its* tokenizer. Two fine-tunes of
one base whose tokenizers gained different tokens — or just list them in another order —
cannot be merged row by row: row :math:`i` means different tokens. Alignment maps every
model's rows into one target vocabulary :math:`\mathcal{V}` first:

* ``target="union"``: the base's tokens in the base's order, then each other model's new
  tokens in model order and id order. The base's rows keep their ids, so the base's
  tokenizer stays valid for them; a tokenizer for the union adds the new tokens after it.
* ``target="base"``: the base's vocabulary; rows of tokens the base lacks are left out
  (that is the choice this option makes; the dropped ids are visible in ``index``).

Model :math:`m`'s aligned row for token :math:`t` is its own row for :math:`t` when it has
the token (an exact copy), else a *fill*: ``fill="base"`` takes the base's row, or — for a
token the base lacks — the mean of the rows of the models that have it; ``fill="mean"``
always takes that mean :math:`\frac{1}{|M_t|}\sum_{m\in M_t} E_m[\mathrm{id}_m(t)]`
(computed in float32, cast back to the matrix's dtype).

Vocabularies come from the tokenizer files (:func:`read_vocab`: Hugging Face's
``tokenizer.json`` — ``model.vocab`` plus ``added_tokens`` — or a ``vocab.json``) or are
given as token lists. Nothing is truncated silently: a matrix with fewer rows than its
vocabulary is an error; one with *more* rows (padding to a multiple of 64, say) is an
error naming the file and both sizes unless ``extra_rows="drop"`` says the rows beyond
the vocabulary are padding to discard.

What costs time: one gather per matrix and model and, for fills, one masked sum over the
models; the vocabulary bookkeeping is plain Python over the tokens. NumPy matrices (as read
from a checkpoint) are aligned with NumPy — nothing is compiled or copied to a device; jax
arrays go through one jitted function per leaf shape, on their device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import paths as paths_lib

Vocab = tuple[str, ...]


def _ids_to_tokens(pairs: list[tuple[str, int]], source: str) -> Vocab:
    by_id: dict[int, str] = {}
    for token, i in pairs:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{source}: token {token!r} has id {i!r}, not a non-negative int")
        if i in by_id and by_id[i] != token:
            raise ValueError(f"{source}: id {i} is both {by_id[i]!r} and {token!r}")
        by_id[i] = token
    n = max(by_id, default=-1) + 1
    if len(by_id) != n:
        hole = next(i for i in range(n) if i not in by_id)
        raise ValueError(
            f"{source}: token ids are not contiguous: {n - len(by_id)} of 0..{n - 1} have no "
            f"token (the first is {hole})"
        )
    tokens = tuple(by_id[i] for i in range(n))
    if len(set(tokens)) != n:
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"{source}: token {dup!r} has two ids")
    return tokens


def read_vocab(path: str | os.PathLike) -> Vocab:
    """A tokenizer's vocabulary, as its tokens in id order.

    Reads Hugging Face's ``tokenizer.json`` (``model.vocab`` — a ``{token: id}`` table for
    BPE/WordPiece/WordLevel, a ``[[token, score], ...]`` list for Unigram, where the id is
    the position — together with ``added_tokens``, the special tokens often given ids after
    the model's vocabulary), or a ``vocab.json`` ``{token: id}`` table (GPT-2 style; an
    ``added_tokens.json`` next to it is included). A directory is searched for
    ``tokenizer.json``, then ``vocab.json``.

    Args:
      path: The file, or a model directory holding one.

    Returns:
      A tuple of token strings; entry ``i`` is token id ``i``.

    Raises:
      FileNotFoundError: naming the path when there is no vocabulary file.
      ValueError: naming the file when its ids are not ``0..n-1`` exactly once each, a
        token has two ids, or the JSON is not a vocabulary.

    Examples:
      >>> import json, tempfile, os
      >>> from fusionjax.io._vocab import read_vocab
      >>> d = tempfile.mkdtemp()
      >>> with open(os.path.join(d, "vocab.json"), "w") as f:
      ...     json.dump({"b": 1, "a": 0, "c": 2}, f)
      >>> read_vocab(d)
      ('a', 'b', 'c')
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.json"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.json in this directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such vocabulary file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    pairs: list[tuple[str, int]] = []
    if isinstance(data, dict) and isinstance(data.get("model"), dict):  # tokenizer.json
        vocab = data["model"].get("vocab")
        if isinstance(vocab, dict):
            pairs = list(vocab.items())
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            pairs = [(entry[0], i) for i, entry in enumerate(vocab)]
        else:
            raise ValueError(f"{path}: model.vocab is neither a table nor a list")
        for tok in data.get("added_tokens") or []:
            pairs.append((tok["content"], tok["id"]))
    elif isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        pairs = list(data.items())
        added = os.path.join(os.path.dirname(path), "added_tokens.json")
        if os.path.basename(path) == "vocab.json" and os.path.isfile(added):
            with open(added, encoding="utf-8") as f:
                pairs += list(json.load(f).items())
    else:
        raise ValueError(f"{path}: expected a tokenizer.json or a {{token: id}} vocab.json")
    return _ids_to_tokens(pairs, path)


class VocabAlignmentOutput(NamedTuple):
    """The target vocabulary and where each model's tokens sit in it.

    Attributes:
      vocab: The target vocabulary (tokens in id order).
      index: Per model, an int array ``[len(vocab)]``: the model's id of each target
        token, ``-1`` where the model lacks it.
      sizes: Per model, the size of its own vocabulary.
      sources: Per model, where its vocabulary came from (the file, or ``vocabs[m]``).
      base: The base model's position.
    """

    vocab: Vocab
    index: list[np.ndarray]
    sizes: list[int]
    sources: list[str]
    base: int


class AlignedEmbeddingsOutput(NamedTuple):
    """Embedding (and head) matrices permuted into one vocabulary.

    Attributes:
      matrices: Per model, its pytree of matrices with ``len(vocab)`` rows along ``axis``.
      vocab: The target vocabulary.
      index: Per model, ``[len(vocab)]`` ints: the source row of each aligned row, ``-1``
        where it was filled.
      filled: Per model, ``[len(vocab)]`` bools: which rows were filled (``index == -1``).
    """

    matrices: list[Any]
    vocab: Vocab
    index: list[np.ndarray]
    filled: list[np.ndarray]


def align_vocabs(
    vocabs: Sequence[Sequence[str] | str | os.PathLike],
    *,
    base: int = 0,
    target: Literal["union", "base"] = "union",
) -> VocabAlignmentOutput:
    """The target vocabulary of several tokenizers and each one's ids in it.

    Args:
      vocabs: Per model, its tokens in id order, or a tokenizer file / directory
        (read by :func:`read_vocab`).
      base: Which model is the base (its tokens come first, its rows fill gaps).
      target: ``"union"`` (the base's tokens, then every other model's new ones in order)
        or ``"base"`` (the base's vocabulary only).

    Returns:
      A :class:`VocabAlignmentOutput`.

    Raises:
      ValueError: an empty ``vocabs``, a ``base`` out of range, an unknown ``target``, or a
        vocabulary with a repeated token (naming its source).

    Examples:
      >>> from fusionjax.io._vocab import align_vocabs
      >>> out = align_vocabs([["a", "b"], ["b", "c"]])
      >>> out.vocab, [i.tolist() for i in out.index]
      (('a', 'b', 'c'), [[0, 1, -1], [-1, 0, 1]])
    """
    if not vocabs:
        raise ValueError("vocabs is empty: align_vocabs needs at least one model")
    if not 0 <= base < len(vocabs):
        raise ValueError(f"base={base} is out of range for {len(vocabs)} vocabularies")
    if target not in ("union", "base"):
        raise ValueError(f"target must be 'union' or 'base', got {target!r}")
    tokens: list[Vocab] = []
    sources: list[str] = []
    for m, v in enumerate(vocabs):
        if isinstance(v, (str, os.PathLike)):
            sources.append(os.fspath(v))
            tokens.append(read_vocab(v))
        else:
            sources.append(f"vocabs[{m}]")
            tokens.append(_ids_to_tokens([(t, i) for i, t in enumerate(v)], sources[-1]))
    order = [base] + [m for m in range(len(tokens)) if m != base]
    ids: dict[str, int] = {}
    for m in order if target == "union" else [base]:
        for t in tokens[m]:
            ids.setdefault(t, len(ids))
    vocab = tuple(ids)
    index = []
    for v in tokens:
        own = np.full(len(vocab), -1, dtype=np.int64)
        for i, t in enumerate(v):
            j = ids.get(t)
            if j is not None:
                own[j] = i
        index.append(own)
    return VocabAlignmentOutput(vocab, index, [len(v) for v in tokens], sources, base)


def _along(mask, ndim: int, axis: int):
    shape = [1] * ndim
    shape[axis] = mask.shape[0]
    return mask.reshape(shape)


def align_embeddings(
    matrices: Sequence[Any],
    vocabs: Sequence[Sequence[str] | str | os.PathLike] | VocabAlignmentOutput,
    *,
    base: int = 0,
    target: Literal["union", "base"] = "union",
    fill: Literal["base", "mean"] = "base",
    axis: int = 0,
    extra_rows: Literal["error", "drop"] = "error",
) -> AlignedEmbeddingsOutput:
    r"""Permutes each model's embedding (and head) rows into one vocabulary.

    Args:
      matrices: Per model, a pytree of matrices indexed by token along ``axis`` (the
        ``embed_tokens`` weight, an ``lm_head`` weight ``[vocab, d]``, ...), the same
        structure and trailing shapes for every model.
      vocabs: Per model, its tokens in id order or its tokenizer file / directory; or an
        :func:`align_vocabs` result (then ``base`` and ``target`` come from it).
      base: The base model's position (see :func:`align_vocabs`).
      target: ``"union"`` or ``"base"`` (see :func:`align_vocabs`).
      fill: Rows for tokens a model lacks: ``"base"`` copies the base's row (the mean of the
        models that have the token when the base lacks it too); ``"mean"`` takes the mean
        of the rows of the models that have the token.
      axis: The token axis of every matrix (``0`` for torch's ``[vocab, d]``; ``1`` for a
        flax ``lm_head`` kernel ``[d, vocab]``).
      extra_rows: A matrix with more rows than its vocabulary has tokens: ``"error"``
        raises; ``"drop"`` treats the rows beyond the vocabulary as padding and leaves
        them out. Fewer rows than tokens always raises.

    Returns:
      An :class:`AlignedEmbeddingsOutput`; ``matrices[m]`` has ``matrices[m]``'s structure
      with ``len(vocab)`` rows along ``axis`` and the input dtypes (NumPy arrays when every
      model's matrix is one, else jax arrays).

    Raises:
      ValueError: naming the vocabulary file (or ``vocabs[m]``), the matrix path and both
        sizes when rows and tokens disagree; mismatched structures or trailing shapes;
        unknown options. All before any row is moved.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.io._vocab import align_embeddings
      >>> e0 = np.array([[0.0], [1.0]], np.float32)   # tokens a, b
      >>> e1 = np.array([[2.0], [3.0]], np.float32)   # tokens b, c
      >>> out = align_embeddings([e0, e1], [["a", "b"], ["b", "c"]])
      >>> out.vocab, np.asarray(out.matrices[1])[:, 0].tolist(), out.filled[1].tolist()
      (('a', 'b', 'c'), [0.0, 2.0, 3.0], [True, False, False])
    """
    if fill not in ("base", "mean"):
        raise ValueError(f"fill must be 'base' or 'mean', got {fill!r}")
    if extra_rows not in ("error", "drop"):
        raise ValueError(f"extra_rows must be 'error' or 'drop', got {extra_rows!r}")
    align = (
        vocabs
        if isinstance(vocabs, VocabAlignmentOutput)
        else align_vocabs(vocabs, base=base, target=target)
    )
    n_models = len(align.index)
    if len(matrices) != n_models:
        raise ValueError(f"{len(matrices)} models' matrices for {n_models} vocabularies")
    treedef = jax.tree.structure(matrices[align.base])
    leaves = []
    for m, tree in enumerate(matrices):
        flat, td = jax.tree_util.tree_flatten_with_path(tree)
        if td != treedef:
            raise ValueError(f"matrices[{m}] has structure {td}, unlike the base's {treedef}")
        leaves.append(flat)
    # Check every size before moving a row.
    for j, (path, ref) in enumerate(leaves[align.base]):
        where = paths_lib.keystr(path) or "the matrix"
        if not -np.ndim(ref) <= axis < np.ndim(ref):
            raise ValueError(f"{where}: axis {axis} is out of range for shape {np.shape(ref)}")
        ax = axis % np.ndim(ref)
        for m in range(n_models):
            x = leaves[m][j][1]
            rows, size, src = np.shape(x)[ax], align.sizes[m], align.sources[m]
            rest, ref_rest = _drop(np.shape(x), ax), _drop(np.shape(ref), ax)
            if rest != ref_rest:
                raise ValueError(
                    f"{where} of model {m} has shape {np.shape(x)}, the base's "
                    f"{np.shape(ref)}: they differ beyond the token axis {axis}"
                )
            if rows < size:
                raise ValueError(
                    f"{src}: the vocabulary has {size} tokens but {where} of model {m} has "
                    f"only {rows} rows along axis {axis}"
                )
            if rows > size and extra_rows == "error":
                raise ValueError(
                    f"{src}: the vocabulary has {size} tokens but {where} of model {m} has "
                    f"{rows} rows along axis {axis}; pass extra_rows='drop' if the rows "
                    "beyond the vocabulary are padding"
                )
    present = [i >= 0 for i in align.index]
    gather = [np.where(p, i, 0).astype(np.int32) for p, i in zip(present, align.index, strict=True)]
    count = np.maximum(np.sum(present, axis=0), 1).astype(np.float32)
    need_fill = not all(p.all() for p in present)
    out_leaves: list[list] = [[] for _ in range(n_models)]
    for j in range(len(leaves[align.base])):
        xs = [leaves[m][j][1] for m in range(n_models)]
        ax = axis % np.ndim(xs[0])
        if all(isinstance(x, np.ndarray) for x in xs):
            aligned = _align_leaf(
                xs, gather, present, count, fill if need_fill else None, align.base, ax, np
            )
        else:
            fill_how = fill if need_fill else None
            aligned = _align_leaf_jit(xs, gather, present, count, fill_how, align.base, ax, jnp)
        for m in range(n_models):
            out_leaves[m].append(aligned[m])
    return AlignedEmbeddingsOutput(
        [treedef.unflatten(ls) for ls in out_leaves],
        align.vocab,
        [np.where(p, i, -1) for p, i in zip(present, align.index, strict=True)],
        [~p for p in present],
    )


def _align_leaf(xs, gather, present, count, fill, base, ax, xp):
    # One matrix per model -> the aligned matrices. `xp` is numpy (NumPy in, NumPy out,
    # nothing compiled) or jax.numpy (under jit: one compilation per leaf shape).
    ndim = xs[0].ndim
    rows = [xp.take(x, g, axis=ax) for x, g in zip(xs, gather, strict=True)]
    if fill is None:  # every model has every token
        return rows
    masks = [_along(xp.asarray(p), ndim, ax) for p in present]
    total = rows[0].astype(np.float32) * 0
    for k, r in zip(masks, rows, strict=True):
        total = total + xp.where(k, r.astype(np.float32), np.float32(0))
    filler = total / _along(xp.asarray(count), ndim, ax)
    if fill == "base":
        filler = xp.where(masks[base], rows[base].astype(np.float32), filler)
    return [xp.where(k, r, filler.astype(x.dtype)) for k, r, x in zip(masks, rows, xs, strict=True)]


_align_leaf_jit = jax.jit(_align_leaf, static_argnums=(4, 5, 6, 7))


def _drop(shape: tuple, axis: int) -> tuple:
    return tuple(s for i, s in enumerate(shape) if i != axis)
