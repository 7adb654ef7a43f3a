r"""Layout maps: PyTorch / Hugging Face checkpoint tensors ↔ flax-style parameter leaves.

A PyTorch checkpoint is a flat ``{name: tensor}`` table (``model.layers.0.mlp.up_proj.weight``)
whose arrays follow torch's conventions; a flax model wants a nested tree whose arrays follow
flax's. A :class:`Layout` is the map between the two, built from the checkpoint's *metadata*
(``{name: jax.ShapeDtypeStruct}``) alone:

* ``layout.leaves[path]`` (a :class:`LayoutLeaf`) says which checkpoint tensors the target
  leaf ``path`` (a tuple of string keys) is built from and how: ``leaf.fn(*tensors)``.
  ``jax.eval_shape(leaf.fn, *specs)`` gives the leaf's spec without data (also in
  ``leaf.spec``).
* ``layout.tensors[name]`` (a :class:`LayoutTensor`) is the inverse: which target leaves the
  checkpoint tensor ``name`` is written back from, and ``tensor.fn(*leaves)``.

The conventions (torch → flax, each exactly invertible):

==================  ==============================  ===================================
layer (kind)        torch / HF tensor               flax leaf
==================  ==============================  ===================================
``linear``          ``X.weight [out, in]``           ``X/kernel [in, out]`` (transpose)
                    ``X.bias [out]``                 ``X/bias``
``gpt2_conv1d``     ``X.weight [in, out]``           ``X/kernel [in, out]`` (as is)
``embedding``       ``X.weight [vocab, d]``          ``X/embedding``
``norm``            ``X.weight``, ``X.bias``         ``X/scale``, ``X/bias``
``conv``            ``X.weight [out, in, *k]``       ``X/kernel [*k, in, out]``
``qkv``             ``P.qkv.weight [3d, d]`` (timm)  ``P/{query,key,value}/kernel [d, d]``
``gpt2_qkv``        ``P.c_attn.weight [d, 3d]``      ``P/{query,key,value}/kernel [d, d]``
``param``           anything (``cls_token``, ...)   the same array, nested on ``"."``
==================  ==============================  ===================================

Biases of the fused ``qkv`` / ``gpt2_qkv`` tensors (``[3d]``) split into the three ``bias``
leaves. A conv kernel ``[out, in, kh, kw]`` becomes ``[kh, kw, in, out]``, the ``HWIO``
layout :func:`jax.lax.conv_general_dilated` takes with
``dimension_numbers=("NHWC", "HWIO", "NHWC")`` (flax's ``nn.Conv``); 1-D and 3-D convs
likewise. Writing back fuses query/key/value into one tensor again, so
``layout.invert(layout.apply(flat)) == flat`` name for name and bit for bit.

Which kind a tensor is comes from its name: the families :data:`FAMILIES` (``"llama"``,
``"gpt2"``, ``"vit"`` for Hugging Face's ViT, ``"timm_vit"``) each hold a short table of
patterns; :func:`hf_layout` picks the family from the names present, :func:`layout_for`
takes it by name, and both accept extra ``rules`` that are tried first.

**Unknown names.** A tensor that no pattern matches raises, naming it (``unknown="error"``,
the default): a torch ``[out, in]`` matrix passed through untransformed would load into a
square flax kernel without complaint and compute the wrong thing. ``unknown="passthrough"``
keeps such tensors as they are, nested on ``"."`` (``a.b.0.c`` → ``a/b/0/c``) — safe for
merging, which writes them back as they came. :func:`flat_layout` passes everything through.

**Tied embeddings.** Llama- and GPT-2-style models may tie the output projection to the
input embedding, and then the checkpoint has no ``lm_head.weight``. By default the layout
records the tie in ``layout.tied`` (``{("lm_head", "kernel"): "model.embed_tokens.weight"}``)
and makes no leaf for it: the model reads its embedding twice, and merging the embedding
merges the head. ``tied="materialize"`` adds the leaf ``lm_head/kernel`` (the embedding
transposed); writing back then stores it as an explicit ``lm_head.weight``, since a merged
head need not equal the merged embedding any more (set ``tie_word_embeddings: false`` in
the model's config). ``tied="error"`` refuses a checkpoint without its head.

**Arrays.** Every ``fn`` accepts NumPy arrays (and returns NumPy arrays — transposes and
slices are views of memory-mapped tensors, nothing is copied to a device, 64-bit dtypes
stay 64-bit) as well as jax arrays and tracers.

What costs time: nothing here reads or copies tensor data; building a layout traces one
tiny function per leaf under :func:`jax.eval_shape` (a few ms per hundred tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import paths as paths_lib

Path = tuple[str, ...]

KINDS = ("linear", "gpt2_conv1d", "embedding", "norm", "conv", "qkv", "gpt2_qkv", "param")
"""The tensor kinds a rule may name (see the module docstring)."""

_QKV = ("query", "key", "value")


class LayoutLeaf(NamedTuple):
    """How one target leaf is read from a checkpoint.

    Attributes:
      sources: The checkpoint tensor names ``fn`` takes, in order.
      fn: ``fn(*tensors) -> array``: the leaf from the tensors (NumPy in, NumPy out;
        jax arrays and tracers too).
      spec: The leaf's :class:`jax.ShapeDtypeStruct`.
      kind: The rule kind that made it (``"linear"``, ``"qkv"``, ...).
    """

    sources: tuple[str, ...]
    fn: Callable[..., Any]
    spec: jax.ShapeDtypeStruct
    kind: str


class LayoutTensor(NamedTuple):
    """How one checkpoint tensor is written back from target leaves.

    Attributes:
      targets: The target leaf paths ``fn`` takes, in order.
      fn: ``fn(*leaves) -> array``: the checkpoint tensor from the leaves.
      spec: The tensor's :class:`jax.ShapeDtypeStruct`.
    """

    targets: tuple[Path, ...]
    fn: Callable[..., Any]
    spec: jax.ShapeDtypeStruct


def _path_str(path: Path) -> str:
    return "/".join(path)


def _nest(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _flatten_target(tree: Any) -> dict[Path, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(paths_lib.path_name(p).split("/")): x for p, x in flat}


class Layout(NamedTuple):
    """A map between a checkpoint's flat tensors and a nested tree of target leaves.

    Built by :func:`hf_layout`, :func:`layout_for` or :func:`flat_layout` from the
    checkpoint's ``{name: jax.ShapeDtypeStruct}``; holds no tensor data.

    Attributes:
      leaves: ``{target path: LayoutLeaf}``, in checkpoint order.
      tensors: ``{checkpoint name: LayoutTensor}``: the inverse, in checkpoint order
        (plus ``lm_head.weight`` when a tied head is materialised).
      specs: The checkpoint's ``{name: jax.ShapeDtypeStruct}`` the layout was built for.
      tied: ``{target path: checkpoint name}`` of tied leaves that have no leaf of their own
        (the path's value is the named tensor, in the tying module's layout).
      family: The convention family (``"llama"``, ``"gpt2"``, ``"vit"``, ``"timm_vit"``,
        ``"flat"``).
    """

    leaves: dict[Path, LayoutLeaf]
    tensors: dict[str, LayoutTensor]
    specs: dict[str, jax.ShapeDtypeStruct]
    tied: dict[Path, str]
    family: str

    def abstract(self) -> dict:
        """The target tree of :class:`jax.ShapeDtypeStruct` (nested dicts of string keys).

        Returns:
          A nested dict with each leaf's spec, e.g. a ``target=`` for restoring.
        """
        return _nest({p: leaf.spec for p, leaf in self.leaves.items()})

    def writers(self, path: Path) -> tuple[str, ...]:
        """The checkpoint tensors written (in part) from the target leaf ``path``.

        A streaming writer buffers leaves until every target of such a tensor has arrived
        (a fused ``qkv`` needs its query, key and value), then writes ``tensor.fn(...)``.

        Args:
          path: A target leaf path (tuple of string keys).

        Returns:
          The checkpoint names whose :attr:`LayoutTensor.targets` include ``path``.
        """
        return tuple(n for n, t in self.tensors.items() if path in t.targets)

    def apply(self, flat: Mapping[str, Any]) -> dict:
        """Maps a checkpoint's tensors to the target tree.

        Args:
          flat: ``{name: array}`` with exactly the names, shapes and dtypes of ``specs``.

        Returns:
          The nested target tree (dicts of string keys).

        Raises:
          ValueError: naming the first missing, unexpected or mis-shaped tensor, before any
            leaf is computed.
        """
        _check_same(flat, self.specs, "checkpoint tensor", "the layout's checkpoint")
        return _nest({p: lf.fn(*(flat[n] for n in lf.sources)) for p, lf in self.leaves.items()})

    def invert(self, tree: Any) -> dict[str, Any]:
        """Maps a target tree back to checkpoint tensors (the inverse of :meth:`apply`).

        Args:
          tree: A pytree whose leaf paths (keys joined by ``/``) are the layout's target
            paths, with their shapes and dtypes: nested dicts as :meth:`apply` returns, or
            a flax ``nnx.State``.

        Returns:
          ``{name: array}`` in checkpoint order.

        Raises:
          ValueError: naming the first missing, unexpected or mis-shaped leaf.
        """
        flat = _flatten_target(tree)
        want = {p: leaf.spec for p, leaf in self.leaves.items()}
        _check_same(
            {_path_str(p): x for p, x in flat.items()},
            {_path_str(p): s for p, s in want.items()},
            "target leaf",
            "the layout's target tree",
        )
        return {n: t.fn(*(flat[p] for p in t.targets)) for n, t in self.tensors.items()}


def _check_same(values: Mapping[str, Any], specs: Mapping[str, Any], what: str, where: str):
    missing = [n for n in specs if n not in values]
    if missing:
        raise ValueError(f"{what} {missing[0]!r} is missing ({len(missing)} missing in all)")
    extra = [n for n in values if n not in specs]
    if extra:
        raise ValueError(f"{what} {extra[0]!r} is not in {where} ({len(extra)} unexpected)")
    for n, s in specs.items():
        x = values[n]
        if tuple(np.shape(x)) != tuple(s.shape) or np.dtype(x.dtype) != np.dtype(s.dtype):
            raise ValueError(
                f"{what} {n!r}: expected {tuple(s.shape)} {np.dtype(s.dtype)}, "
                f"got {tuple(np.shape(x))} {np.dtype(x.dtype)}"
            )


# ----------------------------------------------------------------------------- transforms


def _concat(arrays: Sequence[Any], axis: int):
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.concatenate(arrays, axis=axis)
    return jnp.concatenate(arrays, axis=axis)


def _identity(x):
    return x


def _transpose2(x):
    return x.T


def _conv_perms(ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # [out, in, *k] -> [*k, in, out] and back.
    fwd = (*range(2, ndim), 1, 0)
    inv = tuple(int(i) for i in np.argsort(fwd))
    return fwd, inv


def _slicer(i: int, d: int, axis: int, transpose: bool):
    def fn(x):
        part = x[i * d : (i + 1) * d] if axis == 0 else x[:, i * d : (i + 1) * d]
        return part.T if transpose else part

    return fn


def _fuser(axis: int, transpose: bool):
    def fn(q, k, v):
        parts = [p.T for p in (q, k, v)] if transpose else [q, k, v]
        return _concat(parts, axis)

    return fn


class _Group(NamedTuple):
    # One rule application: forward fns per target (over `sources`), inverse fns per
    # written tensor (over `targets`).
    sources: tuple[str, ...]
    targets: tuple[Path, ...]
    forward: tuple[Callable, ...]
    writes: tuple[str, ...]
    inverse: tuple[Callable, ...]
    kind: str


def _single(name: str, target: Path, fwd: Callable, inv: Callable, kind: str) -> _Group:
    return _Group((name,), (target,), (fwd,), (name,), (inv,), kind)


def _split_name(name: str) -> tuple[Path, str]:
    parts = name.split(".")
    if any(p == "" for p in parts):
        raise ValueError(f"checkpoint tensor {name!r}: empty key in a '.'-separated name")
    return tuple(parts[:-1]), parts[-1]


def _build(name: str, spec: jax.ShapeDtypeStruct, kind: str) -> _Group:
    module, param = _split_name(name)
    shape = tuple(spec.shape)

    def bad(why: str) -> ValueError:
        return ValueError(f"checkpoint tensor {name!r} (kind {kind!r}): {why}, got shape {shape}")

    if kind == "param":
        return _single(name, (*module, param), _identity, _identity, kind)
    if param not in ("weight", "bias"):
        raise bad(f"expected a name ending in '.weight' or '.bias', not {param!r}")
    if param == "bias":
        if len(shape) != 1:
            raise bad("a bias must be 1-D")
        if kind in ("qkv", "gpt2_qkv"):
            if shape[0] % 3:
                raise bad("a fused q/k/v bias needs a length divisible by 3")
            d = shape[0] // 3
            parent = module[:-1]
            return _Group(
                (name,),
                tuple((*parent, q, "bias") for q in _QKV),
                tuple(_slicer(i, d, 0, False) for i in range(3)),
                (name,),
                (_fuser(0, False),),
                kind,
            )
        return _single(name, (*module, "bias"), _identity, _identity, kind)
    # weight
    if kind == "linear":
        if len(shape) != 2:
            raise bad("a Linear weight must be 2-D [out, in]")
        return _single(name, (*module, "kernel"), _transpose2, _transpose2, kind)
    if kind == "gpt2_conv1d":
        if len(shape) != 2:
            raise bad("a GPT-2 Conv1D weight must be 2-D [in, out]")
        return _single(name, (*module, "kernel"), _identity, _identity, kind)
    if kind == "embedding":
        if len(shape) != 2:
            raise bad("an embedding must be 2-D [vocab, features]")
        return _single(name, (*module, "embedding"), _identity, _identity, kind)
    if kind == "norm":
        return _single(name, (*module, "scale"), _identity, _identity, kind)
    if kind == "conv":
        if len(shape) < 3:
            raise bad("a conv weight must be [out, in, *kernel] with at least one spatial axis")
        fwd, inv = _conv_perms(len(shape))
        return _single(
            name, (*module, "kernel"), lambda x: x.transpose(fwd), lambda x: x.transpose(inv), kind
        )
    if kind in ("qkv", "gpt2_qkv"):
        if len(shape) != 2:
            raise bad("a fused q/k/v weight must be 2-D")
        # timm's Linear qkv is [3d, d_in] (split rows, then transpose);
        # GPT-2's Conv1D c_attn is [d_in, 3d] (split columns).
        axis, transpose = (0, True) if kind == "qkv" else (1, False)
        if shape[axis] % 3:
            raise bad(f"a fused q/k/v weight needs axis {axis} divisible by 3")
        d = shape[axis] // 3
        parent = module[:-1]
        return _Group(
            (name,),
            tuple((*parent, q, "kernel") for q in _QKV),
            tuple(_slicer(i, d, axis, transpose) for i in range(3)),
            (name,),
            (_fuser(axis, transpose),),
            kind,
        )
    raise ValueError(f"unknown layout kind {kind!r} for {name!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------- families

_NORM = r"(?:.*\.)?(?:[a-z_]*norm[a-z_0-9]*|ln_\w+|ln\d*)\.(?:weight|bias)"

# Each family: (pattern, kind) pairs, matched with re.fullmatch, first match wins.
_LLAMA = (
    (r"(?:.*\.)?embed_tokens\.weight", "embedding"),
    (r"(?:.*\.)?(?:self_attn|mlp|block_sparse_moe)\.(?:.*\.)?\w+_proj\.(?:weight|bias)", "linear"),
    (r"(?:.*\.)?(?:mlp|block_sparse_moe)\.(?:.*\.)?(?:gate|w\d)\.weight", "linear"),
    (r"(?:.*\.)?lm_head\.(?:weight|bias)", "linear"),
    (r"(?:.*\.)?score\.weight", "linear"),
    (r"(?:.*\.)?rotary_emb\.inv_freq", "param"),
    (_NORM, "norm"),
)
_GPT2 = (
    (r"(?:.*\.)?(?:wte|wpe)\.weight", "embedding"),
    (r"(?:.*\.)?attn\.c_attn\.(?:weight|bias)", "gpt2_qkv"),
    (r"(?:.*\.)?(?:attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(?:weight|bias)", "gpt2_conv1d"),
    (r"(?:.*\.)?attn\.(?:bias|masked_bias)", "param"),  # causal-mask buffers, not params
    (r"(?:.*\.)?(?:lm_head|score)\.(?:weight|bias)", "linear"),
    (_NORM, "norm"),
)
_VIT = (
    (r"(?:.*\.)?patch_embeddings\.projection\.(?:weight|bias)", "conv"),
    (
        r"(?:.*\.)?embeddings\.(?:cls_token|position_embeddings|mask_token|distillation_token)",
        "param",
    ),
    (r"(?:.*\.)?attention\.attention\.(?:query|key|value)\.(?:weight|bias)", "linear"),
    (
        r"(?:.*\.)?(?:attention\.output|intermediate|output|pooler)\.dense\.(?:weight|bias)",
        "linear",
    ),
    (r"(?:.*\.)?(?:classifier|distillation_classifier)\.(?:weight|bias)", "linear"),
    (_NORM, "norm"),
)
_TIMM_VIT = (
    (r"(?:.*\.)?patch_embed\.proj\.(?:weight|bias)", "conv"),
    (r"(?:.*\.)?(?:cls_token|pos_embed|reg_token|dist_token|ls\d\.gamma)", "param"),
    (r"(?:.*\.)?attn\.qkv\.(?:weight|bias)", "qkv"),
    (r"(?:.*\.)?(?:attn\.proj|mlp\.fc\d|head|head_dist|pre_logits\.fc)\.(?:weight|bias)", "linear"),
    (_NORM, "norm"),
)

FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _LLAMA,
    "gpt2": _GPT2,
    "vit": _VIT,
    "timm_vit": _TIMM_VIT,
}
"""Each family's ``(pattern, kind)`` rules (``re.fullmatch`` on the tensor name, first wins).

``llama``: Llama, Mistral, Qwen2, Mixtral-style (``model.layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.embed_tokens``, ``lm_head``). ``gpt2``:
``transformer.h.N.attn.c_attn`` (fused, Conv1D), ``mlp.c_fc``, ``ln_1``, ``wte``, ``wpe``.
``vit``: Hugging Face ``vit.encoder.layer.N.attention.attention.query``, the patch conv.
``timm_vit``: timm ``blocks.N.attn.qkv`` (fused, Linear), ``patch_embed.proj`` (conv).
"""

# Names that decide the family in hf_layout.
_DETECT = {
    "llama": re.compile(r"(?:.*\.)?(?:layers\.\d+\.self_attn\.[qkvo]_proj|embed_tokens)\.weight"),
    "gpt2": re.compile(r"(?:.*\.)?h\.\d+\.attn\.c_attn\.weight"),
    "vit": re.compile(r"(?:.*\.)?layer\.\d+\.attention\.attention\.query\.weight"),
    "timm_vit": re.compile(r"(?:.*\.)?(?:blocks\.\d+\.attn\.qkv|patch_embed\.proj)\.weight"),
}

# Tied output heads: (head weight name, embedding weight name) patterns per family.
_TIES = {
    "llama": (r"(?:.*\.)?lm_head\.weight", r"(?:.*\.)?embed_tokens\.weight"),
    "gpt2": (r"(?:.*\.)?lm_head\.weight", r"(?:.*\.)?wte\.weight"),
}


def _tie_target(family: str, specs: Mapping[str, Any]) -> tuple[str, str] | None:
    """(head name the file would have, embedding name) when the head is absent."""
    if family not in _TIES:
        return None
    head_re, emb_re = (re.compile(p) for p in _TIES[family])
    if any(head_re.fullmatch(n) for n in specs):
        return None
    embs = [n for n in specs if emb_re.fullmatch(n)]
    if len(embs) != 1:
        return None
    # Hugging Face's *ForCausalLM puts the head at the top: `lm_head.weight` next to
    # `model.embed_tokens.weight` (Llama) or `transformer.wte.weight` (GPT-2).
    return "lm_head.weight", embs[0]


def _compile(rules: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    out = []
    for pattern, kind in rules:
        if kind not in KINDS:
            raise ValueError(f"rule {pattern!r}: unknown kind {kind!r}; expected one of {KINDS}")
        try:
            out.append((re.compile(pattern), kind))
        except re.error as e:
            raise ValueError(f"rule {pattern!r}: not a regular expression ({e})") from None
    return out


def _specs_of(specs: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    out = {}
    for n, s in specs.items():
        if not isinstance(n, str):
            raise TypeError(f"checkpoint tensor names must be strings, got {n!r}")
        if not hasattr(s, "shape") or not hasattr(s, "dtype"):
            raise TypeError(f"checkpoint tensor {n!r}: expected an array or ShapeDtypeStruct")
        out[n] = jax.ShapeDtypeStruct(tuple(s.shape), s.dtype)
    return out


def _assemble(
    specs: dict[str, jax.ShapeDtypeStruct],
    kinds: dict[str, str],
    family: str,
    tied: dict[Path, str],
    extra_groups: Sequence[_Group] = (),
) -> Layout:
    groups = [_build(n, specs[n], kinds[n]) for n in specs] + list(extra_groups)
    leaves: dict[Path, LayoutLeaf] = {}
    owner: dict[Path, str] = {}
    tensors: dict[str, LayoutTensor] = {}
    for g in groups:
        src_specs = [specs[n] for n in g.sources]
        for path, fn in zip(g.targets, g.forward, strict=True):
            if path in owner:
                raise ValueError(
                    f"checkpoint tensors {owner[path]!r} and {g.sources[0]!r} both map to the "
                    f"leaf {_path_str(path)!r}"
                )
            out = jax.eval_shape(fn, *src_specs)
            # Every transform keeps the dtype; eval_shape would canonicalise 64-bit ones.
            spec = jax.ShapeDtypeStruct(out.shape, src_specs[0].dtype)
            leaves[path] = LayoutLeaf(g.sources, fn, spec, g.kind)
            owner[path] = g.sources[0]
        for name, fn in zip(g.writes, g.inverse, strict=True):
            spec = specs.get(name)
            if spec is None:  # a materialised tied head: the embedding transposed back
                t = leaves[g.targets[0]].spec
                spec = jax.ShapeDtypeStruct(tuple(reversed(t.shape)), t.dtype)
            tensors[name] = LayoutTensor(g.targets, fn, spec)
    # A leaf cannot also be an inner node of the nested tree.
    for path in leaves:
        for i in range(1, len(path)):
            if path[:i] in leaves:
                raise ValueError(
                    f"checkpoint tensors {owner[path[:i]]!r} and {owner[path]!r} collide: "
                    f"{_path_str(path[:i])!r} would be both a leaf and a subtree"
                )
    return Layout(leaves, tensors, specs, tied, family)


def flat_layout(specs: Mapping[str, Any]) -> Layout:
    """The identity layout: every tensor as it is, its name nested on ``"."``.

    ``model.layers.0.mlp.up_proj.weight`` becomes the leaf
    ``("model", "layers", "0", "mlp", "up_proj", "weight")`` (digits stay string keys).

    Args:
      specs: The checkpoint's ``{name: jax.ShapeDtypeStruct}`` (arrays work too).

    Returns:
      A :class:`Layout` of family ``"flat"``.

    Raises:
      ValueError: if a name has an empty key, or one name is a prefix of another
        (``a.b`` and ``a.b.c``).

    Examples:
      >>> import jax, numpy as np
      >>> from fusionjax.io._layout import flat_layout
      >>> lay = flat_layout({"a.0.w": jax.ShapeDtypeStruct((2, 3), np.float32)})
      >>> list(lay.leaves)
      [('a', '0', 'w')]
    """
    specs = _specs_of(specs)
    return _assemble(specs, dict.fromkeys(specs, "param"), "flat", {})


def layout_for(
    family: str,
    specs: Mapping[str, Any],
    *,
    rules: Sequence[tuple[str, str]] = (),
    unknown: Literal["error", "passthrough"] = "error",
    tied: Literal["record", "materialize", "error"] = "record",
) -> Layout:
    r"""The layout of a checkpoint in a named convention family.

    Each tensor name is matched (``re.fullmatch``) against ``rules`` first, then the
    family's table (:data:`FAMILIES`); the first match gives its kind
    (:data:`KINDS`, see the module docstring for what each does).

    Args:
      family: ``"llama"``, ``"gpt2"``, ``"vit"`` (Hugging Face ViT) or ``"timm_vit"``.
      specs: The checkpoint's ``{name: jax.ShapeDtypeStruct}`` (arrays work too); no
        tensor data is read.
      rules: Extra ``(pattern, kind)`` pairs tried before the family's, e.g.
        ``[(r".*\.adapter\.weight", "linear")]``.
      unknown: What a name no rule matches does: ``"error"`` raises naming it;
        ``"passthrough"`` keeps the tensor as it is, nested on ``"."``.
      tied: When a Llama/GPT-2 checkpoint has no ``lm_head.weight`` (the head is tied to
        the input embedding): ``"record"`` notes the tie in :attr:`Layout.tied` and makes
        no leaf; ``"materialize"`` adds the leaf ``lm_head/kernel`` (the embedding,
        transposed), written back as an explicit ``lm_head.weight``; ``"error"`` raises.

    Returns:
      A :class:`Layout`.

    Raises:
      ValueError: an unknown family, kind or option; a tensor no rule matches (with
        ``unknown="error"``), naming it; a tensor whose shape does not fit its kind
        (``a Linear weight must be 2-D``), naming it and its shape; two tensors mapping
        to one leaf.

    Examples:
      >>> import jax, numpy as np
      >>> from fusionjax.io._layout import layout_for
      >>> f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
      >>> lay = layout_for("gpt2", {"h.0.attn.c_attn.weight": f32(4, 12)})
      >>> for path, leaf in lay.leaves.items():
      ...     print("/".join(path), leaf.spec.shape)
      h/0/attn/query/kernel (4, 4)
      h/0/attn/key/kernel (4, 4)
      h/0/attn/value/kernel (4, 4)
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown layout family {family!r}; expected one of {sorted(FAMILIES)}")
    if unknown not in ("error", "passthrough"):
        raise ValueError(f"unknown must be 'error' or 'passthrough', got {unknown!r}")
    if tied not in ("record", "materialize", "error"):
        raise ValueError(f"tied must be 'record', 'materialize' or 'error', got {tied!r}")
    specs = _specs_of(specs)
    table = _compile(rules) + _compile(FAMILIES[family])
    kinds: dict[str, str] = {}
    for name in specs:
        kind = next((k for pat, k in table if pat.fullmatch(name)), None)
        if kind is None:
            if unknown == "error":
                raise ValueError(
                    f"checkpoint tensor {name!r} matches no {family!r} layout rule; pass "
                    "rules=[(pattern, kind)] to map it, or unknown='passthrough' to keep it "
                    "as it is"
                )
            kind = "param"
        kinds[name] = kind
    tie = _tie_target(family, specs)
    tied_map: dict[Path, str] = {}
    extra: list[_Group] = []
    if tie is not None:
        head, emb = tie
        head_module = tuple(head.split(".")[:-1])
        if tied == "error":
            raise ValueError(
                f"the checkpoint has no {head!r} (tied to {emb!r}); pass tied='record' or "
                "tied='materialize'"
            )
        if tied == "record":
            tied_map[(*head_module, "kernel")] = emb
        else:
            extra.append(
                _Group(
                    (emb,),
                    ((*head_module, "kernel"),),
                    (_transpose2,),
                    (head,),
                    (_transpose2,),
                    "linear",
                )
            )
    return _assemble(specs, kinds, family, tied_map, extra)


def detect_family(names: Sequence[str] | Mapping[str, Any]) -> str:
    """The convention family of a checkpoint, from its tensor names.

    Args:
      names: The tensor names (or a ``{name: spec}`` mapping).

    Returns:
      ``"llama"``, ``"gpt2"``, ``"vit"`` or ``"timm_vit"``.

    Raises:
      ValueError: if no family's telltale names are present, or more than one family's
        are (the message names one telltale tensor of each).
    """
    names = list(names)
    found = {}
    for fam, pat in _DETECT.items():
        hit = next((n for n in names if pat.fullmatch(n)), None)
        if hit is not None:
            found[fam] = hit
    if not found:
        shown = ", ".join(repr(n) for n in names[:3])
        raise ValueError(
            f"cannot tell the checkpoint's layout family from its {len(names)} tensor names "
            f"({shown}, ...); pass it to layout_for(family, ...), one of {sorted(FAMILIES)}"
        )
    if len(found) > 1:
        which = ", ".join(f"{f} ({n!r})" for f, n in found.items())
        raise ValueError(f"the checkpoint's tensor names fit several layout families: {which}")
    return next(iter(found))


def hf_layout(
    specs: Mapping[str, Any],
    *,
    rules: Sequence[tuple[str, str]] = (),
    unknown: Literal["error", "passthrough"] = "error",
    tied: Literal["record", "materialize", "error"] = "record",
) -> Layout:
    """The layout of a PyTorch / Hugging Face checkpoint, its family detected from the names.

    Equivalent to ``layout_for(detect_family(specs), specs, ...)``.

    Args:
      specs: The checkpoint's ``{name: jax.ShapeDtypeStruct}`` (arrays work too).
      rules: Extra ``(pattern, kind)`` rules, as in :func:`layout_for`.
      unknown: ``"error"`` or ``"passthrough"``, as in :func:`layout_for`.
      tied: ``"record"``, ``"materialize"`` or ``"error"``, as in :func:`layout_for`.

    Returns:
      A :class:`Layout`.

    Raises:
      ValueError: as :func:`detect_family` and :func:`layout_for`.

    Examples:
      >>> import jax, numpy as np
      >>> from fusionjax.io._layout import hf_layout
      >>> f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
      >>> lay = hf_layout({"model.embed_tokens.weight": f32(10, 4),
      ...                  "model.layers.0.self_attn.q_proj.weight": f32(8, 4)})
      >>> lay.family, lay.abstract()["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape
      ('llama', (4, 8))
      >>> lay.tied
      {('lm_head', 'kernel'): 'model.embed_tokens.weight'}
    """
    return layout_for(detect_family(specs), specs, rules=rules, unknown=unknown, tied=tied)
