r"""Hand-written permutation specs for the architectures of :mod:`fusionjax.zoo`.

Each spec lists, per group of hidden units, every ``(leaf path, axis)`` that carries
those units: the output axis of the layer computing them, its bias and norm
parameters (and BatchNorm running statistics), and the input axis of every layer
reading them. Groups come in forward order (order of first appearance in the forward
pass), which OT fusion follows. :func:`~fusionjax.alignment.derive_spec` finds the
same groups from the jaxpr; these specs document them and serve as a check.

For a layer :math:`h_\ell = \sigma(W_\ell h_{\ell-1} + b_\ell)`, permuting its units by
:math:`P_\ell` gives :math:`W_\ell \to P_\ell W_\ell P_{\ell-1}^\top`,
:math:`b_\ell \to P_\ell b_\ell`, and the network is unchanged (Git Re-Basin).
A residual stream :math:`x + f(x)` forces every layer writing to it to share one
permutation; LayerNorm is equivariant to permutations of the features it normalises.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
"""

from __future__ import annotations

from collections.abc import Sequence

from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import normalize_path

Axes = list[tuple[str, int]]


def _prefixed(groups: dict[str, Axes], prefix: str | None) -> PermutationSpec:
    """The spec of ``groups`` with ``prefix/`` put before every path (none if empty)."""
    pre = normalize_path(prefix) if prefix else ""
    return PermutationSpec(
        {k: [(f"{pre}/{p}" if pre else p, a) for p, a in v] for k, v in groups.items()}
    )


def _dense_out(name: str) -> Axes:
    """The output units of a ``nn.Dense``: kernel ``[in, out]`` axis 1 and the bias."""
    return [(f"{name}/kernel", 1), (f"{name}/bias", 0)]


def mlp_spec(num_hidden: int, *, prefix: str | None = "params") -> PermutationSpec:
    r"""Spec of :class:`fusionjax.zoo.MLP` with ``num_hidden`` hidden layers.

    Group ``P_i`` is hidden layer ``i``: ``Dense_i`` kernel axis 1 and bias (its
    outputs, :math:`P_i W_i`, :math:`P_i b_i`) and ``Dense_{i+1}`` kernel axis 0 (its
    input, :math:`W_{i+1} P_i^\top`).

    Args:
      num_hidden: Number of hidden layers (``len(widths)``).
      prefix: Path before the layer names: ``"params"`` for a linen variables dict,
        ``None`` for the bare params.

    Returns:
      A :class:`~fusionjax.alignment.PermutationSpec` with groups ``P_0 ... P_{L-1}``.

    Examples:
      >>> mlp_spec(1)
      PermutationSpec(1 groups)
        P_0: params/Dense_0/kernel[1], params/Dense_0/bias[0], params/Dense_1/kernel[0]

    References:
      Ainsworth et al, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    groups = {
        f"P_{i}": [*_dense_out(f"Dense_{i}"), (f"Dense_{i + 1}/kernel", 0)]
        for i in range(num_hidden)
    }
    return _prefixed(groups, prefix)


def vgg_spec(features: Sequence[int | str], *, prefix: str | None = "params") -> PermutationSpec:
    r"""Spec of :class:`fusionjax.zoo.VGG` built with the same ``features``.

    Group ``P_i`` is the channels of convolution ``Conv_i``: its kernel
    ``[kh, kw, in, out]`` axis 3 and bias, and the input axis of the next reader
    (``Conv_{i+1}`` kernel axis 2, or ``Dense_0`` kernel axis 0 after global average
    pooling). Max pooling and ReLU act per channel, so they commute with :math:`P_i`.

    Args:
      features: Channels per convolution with ``"M"`` for max pooling, as given to
        :class:`fusionjax.zoo.VGG`.
      prefix: Path before the layer names (``"params"`` for a linen variables dict).

    Returns:
      A :class:`~fusionjax.alignment.PermutationSpec` with one group ``P_i`` per
      convolution.

    References:
      Ainsworth et al, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
      (VGG-16 on CIFAR-10)
    """
    n = sum(1 for f in features if f != "M")
    groups = {}
    for i in range(n):
        reader = (f"Conv_{i + 1}/kernel", 2) if i + 1 < n else ("Dense_0/kernel", 0)
        groups[f"P_{i}"] = [(f"Conv_{i}/kernel", 3), (f"Conv_{i}/bias", 0), reader]
    return _prefixed(groups, prefix)


def _norm_axes(name: str, norm: str) -> Axes:
    """Scale and bias of a norm layer; BatchNorm adds its running ``mean`` and ``var``."""
    axes = [(f"params/{name}/scale", 0), (f"params/{name}/bias", 0)]
    if norm == "batch":
        axes += [(f"batch_stats/{name}/mean", 0), (f"batch_stats/{name}/var", 0)]
    return axes


def _conv_out(conv: str, norm_name: str, norm: str) -> Axes:
    """Output channels of a bias-free conv followed by a norm layer."""
    return [(f"params/{conv}/kernel", 3), *_norm_axes(norm_name, norm)]


def resnet_spec(blocks: int, *, norm: str = "batch", prefix: str | None = None) -> PermutationSpec:
    r"""Spec of :class:`fusionjax.zoo.ResNet` with ``blocks`` residual blocks per stage.

    Paths cover the whole linen variables dict: ``params/...`` and, for
    ``norm="batch"``, the running statistics ``batch_stats/.../mean|var``, which are
    permuted with their channels (a BatchNorm in eval mode is the per-channel affine
    map :math:`\gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`).

    Groups, in forward order:

    * ``stage{s}``: the residual stream of stage ``s``. The identity shortcut
      :math:`x + f(x)` makes the stem (stage 0) or the first block's 1x1
      ``shortcut_conv`` (stages 1, 2), every block's ``conv2`` with ``norm2``, and the
      input axis of every conv reading the stream (the next blocks' ``conv1``, the next
      stage's ``conv1`` and ``shortcut_conv``, or the ``head``) share one permutation.
      A shortcut conv starts a new stream.
    * ``stage{s}_block{b}``: the block's inner channels: ``conv1`` output, ``norm1``,
      ``conv2`` input.

    Args:
      blocks: Residual blocks per stage (``3`` for ResNet-20).
      norm: ``"batch"`` or ``"layer"``, as the model's ``norm``.
      prefix: Optional path before the collections ``params``/``batch_stats`` (e.g.
        when the variables dict sits under a key of a larger tree).

    Returns:
      A :class:`~fusionjax.alignment.PermutationSpec` with groups ``stage0``,
      ``stage0_block0``, ..., ``stage1_block0``, ``stage1``, ``stage1_block1``, ...

    Raises:
      ValueError: if ``norm`` is neither ``"batch"`` nor ``"layer"``.

    References:
      Ainsworth et al, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
      (ResNet-20 on CIFAR-10)
    """
    if norm not in ("batch", "layer"):
        raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")
    groups: dict[str, Axes] = {}
    stream = "stage0"
    groups[stream] = _conv_out("stem_conv", "stem_norm", norm)
    for s in range(3):
        for b in range(blocks):
            blk = f"stage{s}_block{b}"
            reader = [(f"params/{blk}/conv1/kernel", 2)]
            if s > 0 and b == 0:  # the shortcut reads the previous stream, writes a new one
                reader.append((f"params/{blk}/shortcut_conv/kernel", 2))
            groups[stream] += reader
            groups[blk] = [
                *_conv_out(f"{blk}/conv1", f"{blk}/norm1", norm),
                (f"params/{blk}/conv2/kernel", 2),
            ]
            if s > 0 and b == 0:
                stream = f"stage{s}"
                groups[stream] = _conv_out(f"{blk}/shortcut_conv", f"{blk}/shortcut_norm", norm)
            groups[stream] += _conv_out(f"{blk}/conv2", f"{blk}/norm2", norm)
    groups[stream].append(("params/head/kernel", 0))
    return _prefixed(groups, prefix)


def transformer_spec(depth: int, *, prefix: str | None = "params") -> PermutationSpec:
    r"""Spec of :class:`fusionjax.zoo.Transformer` with ``depth`` blocks.

    Groups, in forward order:

    * ``residual``: the residual stream of width ``d``. Every layer adding to it
      (``embed``, axis 1 of ``pos_embedding``, attention ``out``, ``mlp_out``) and every
      layer reading it (``query/key/value`` kernels axis 0, ``mlp_in``, ``head``) share
      one permutation; LayerNorm commutes with it (mean and variance over features are
      permutation invariant), so all ``scale``/``bias`` go with it.
    * ``block_{i}/heads``: the attention heads. Permuting heads :math:`h \to \pi(h)`
      in ``query/key/value`` (kernel axis 1, bias axis 0) and ``out`` (kernel axis 0)
      permutes the per-head softmax attentions and their sum.
    * ``block_{i}/qk``: the query-key dimension within a head, shared by all heads:
      :math:`q_h^\top k_h = (P q_h)^\top (P k_h)` (query/key kernel axis 2, bias axis 1).
    * ``block_{i}/vo``: the value dimension within a head, read by ``out`` (value kernel
      axis 2 and bias axis 1, out kernel axis 1).
    * ``block_{i}/mlp``: the MLP's hidden units (``mlp_in`` output, ``mlp_out`` input).

    Args:
      depth: Number of transformer blocks.
      prefix: Path before the layer names (``"params"`` for a linen variables dict).

    Returns:
      A :class:`~fusionjax.alignment.PermutationSpec` with ``1 + 4 * depth`` groups.

    References:
      Ainsworth et al, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_, ICLR 2023;
      Verma & Elbayad, `Merging Text Transformer Models from Different Initializations
      <https://arxiv.org/abs/2403.00986>`_, TMLR 2024 (heads and residual stream)
    """
    residual: Axes = [*_dense_out("embed"), ("pos_embedding", 1)]
    blocks: dict[str, Axes] = {}
    for i in range(depth):
        blk, att = f"block_{i}", f"block_{i}/attn"
        qkv = [f"{att}/{n}" for n in ("query", "key", "value")]
        residual += [(f"{blk}/ln1/scale", 0), (f"{blk}/ln1/bias", 0)]
        residual += [(f"{n}/kernel", 0) for n in qkv]
        residual += [(f"{att}/out/kernel", 2), (f"{att}/out/bias", 0)]
        residual += [(f"{blk}/ln2/scale", 0), (f"{blk}/ln2/bias", 0), (f"{blk}/mlp_in/kernel", 0)]
        residual += _dense_out(f"{blk}/mlp_out")
        blocks[f"{blk}/heads"] = [
            *((f"{n}/{leaf}", ax) for n in qkv for leaf, ax in (("kernel", 1), ("bias", 0))),
            (f"{att}/out/kernel", 0),
        ]
        blocks[f"{blk}/qk"] = [
            (f"{n}/{leaf}", ax) for n in qkv[:2] for leaf, ax in (("kernel", 2), ("bias", 1))
        ]
        blocks[f"{blk}/vo"] = [
            (f"{qkv[2]}/kernel", 2),
            (f"{qkv[2]}/bias", 1),
            (f"{att}/out/kernel", 1),
        ]
        blocks[f"{blk}/mlp"] = [*_dense_out(f"{blk}/mlp_in"), (f"{blk}/mlp_out/kernel", 0)]
    residual += [("ln_final/scale", 0), ("ln_final/bias", 0), ("head/kernel", 0)]
    return _prefixed({"residual": residual, **blocks}, prefix)
