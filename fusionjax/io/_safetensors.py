"""safetensors checkpoints: one file or Hugging Face shards with their index.

Layout. A file is an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` and the tensors' bytes; offsets are relative to the end of the
header. A sharded checkpoint is a directory of ``model-0000k-of-0000N.safetensors``
files and ``model.safetensors.index.json`` whose ``weight_map`` names each
tensor's file (Hugging Face's layout); a directory with one ``model.safetensors``
and no index is a one-shard checkpoint.

What costs time, and what is done about it: metadata (names, shapes, dtypes) is
read from the JSON headers alone, so opening a 70B checkpoint reads a few MB.
Tensors are read one at a time as NumPy views of a memory map of each file at
the offsets the header gives (no copy; the previous leaf's pages are released
with ``madvise`` so resident memory stays near one leaf). Writing computes
every tensor's offset from the specs first, writes the header, and then each
tensor at its offset with ``pwrite`` as it arrives (in any order), on one
background thread so that writing a leaf overlaps merging the next; at most
``SafetensorsSink.MAX_PENDING`` leaves wait to be written.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import mmap
import os
import pathlib
import struct
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import stream
from fusionjax.io import _atomic
from fusionjax.io import _names
from fusionjax.io._sink import CheckpointSink

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
    "F8_E5M2": np.dtype(jnp.float8_e5m2),
}
_CODES = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype: Any, name: str = "") -> str:
    """The safetensors code of a NumPy/JAX dtype (``"BF16"``), or ``ValueError``."""
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(
            f"safetensors cannot store the dtype {dt}" + (f" of {name!r}" if name else "") + "."
        )
    return _CODES[dt]


# -- reading headers ----------------------------------------------------------


class Header:
    """One file's parsed header: ``entries`` ``{name: (dtype, shape, begin, end)}``."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("the file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit the file size {size}")
                raw = f.read(n)
        except FileNotFoundError:
            raise FileNotFoundError(f"safetensors file not found: {path}") from None
        except (ValueError, struct.error) as e:
            raise ValueError(f"{path} is not a valid safetensors file: {e}.") from None
        try:
            obj = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("the header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}.") from None
        self.metadata = obj.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - 8 - n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in obj.items():
            try:
                dt = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{path} has a corrupt safetensors header entry for {name!r}: {err!r}."
                ) from None
            if end - begin != math.prod(shape) * dt.itemsize or begin < 0 or end > data_size:
                raise ValueError(
                    f"{path} has a corrupt safetensors header: {name!r} ({e['dtype']} "
                    f"{list(shape)}) has offsets [{begin}, {end}] for {data_size} data bytes."
                )
            self.entries[name] = (dt, shape, begin, end)


def _checkpoint_files(path: pathlib.Path) -> tuple[dict[str, pathlib.Path], list[pathlib.Path]]:
    """``({tensor name: file} from the index or None, the files)`` of a checkpoint."""
    if path.is_file():
        return {}, [path]
    if not path.exists():
        raise FileNotFoundError(f"safetensors checkpoint not found: {path}")
    index = path / INDEX_FILE
    if not index.exists():
        found = sorted(path.glob("*.safetensors.index.json"))
        index = found[0] if len(found) == 1 else index
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}.") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if f not in files and not f.is_file():
                raise FileNotFoundError(f"{index} maps {name!r} to {fname}, which does not exist.")
            files[f] = True
        return {k: path / v for k, v in weight_map.items()}, list(files)
    single = path / SINGLE_FILE
    if single.is_file():
        return {}, [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files (and no {INDEX_FILE}) in {path}")
    return {}, files


def read_specs(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, pathlib.Path], dict]:
    """Every tensor's spec and file, from the headers alone (see :func:`read_index`)."""
    specs, where, metadata, _ = read_index(path)
    return specs, where, metadata


def read_index(path: str | os.PathLike):
    """Every tensor's spec, file and byte range, from the headers alone.

    Returns:
      ``({name: ShapeDtypeStruct}, {name: file}, metadata, {name: (begin, end)})``:
      metadata of the first file; ``begin``/``end`` are absolute file offsets.

    Raises:
      FileNotFoundError: if the checkpoint or a shard is missing.
      ValueError: if a header or the index is corrupt, the index names a
        tensor its file lacks, or a tensor is in two files.
    """
    path = pathlib.Path(path)
    weight_map, files = _checkpoint_files(path)
    specs: dict[str, Any] = {}
    where: dict[str, pathlib.Path] = {}
    ranges: dict[str, tuple[int, int]] = {}
    metadata: dict = {}
    for f in files:
        h = Header(f)
        metadata = metadata or h.metadata
        for name, (dt, shape, begin, end) in h.entries.items():
            if weight_map and weight_map.get(name) != f:
                continue  # the index is authoritative: a stray copy elsewhere is ignored
            if name in where:
                raise ValueError(f"the tensor {name!r} is in both {where[name]} and {f}.")
            specs[name] = jax.ShapeDtypeStruct(shape, dt)
            where[name] = f
            ranges[name] = (h.data_start + begin, h.data_start + end)
    for name, f in weight_map.items():
        if name not in where:
            raise ValueError(f"the index maps {name!r} to {f}, but that file has no such tensor.")
    # Tensors in header order per file; the pytree order is decided by nesting.
    return specs, where, metadata, ranges


# -- the source ---------------------------------------------------------------


class SafetensorsSource:
    """A :class:`fusionjax.LeafSource` over a safetensors checkpoint (file or shards).

    Leaves are nested dicts of string keys split from the tensor names on
    ``"."`` (``model.layers.0.w`` → ``['model']['layers']['0']['w']``), or the
    leaves of ``target`` matched by flat name. Metadata comes from the headers;
    :meth:`read` memory-maps one tensor.

    Attributes:
      path: The checkpoint path.
      names: The flat tensor name of every leaf.
      treedef, paths, specs, kinds: See :class:`fusionjax.LeafSource`.
    """

    def __init__(self, path: str | os.PathLike, *, target: Any = None):
        self.path = pathlib.Path(path)
        specs, self._files, self.metadata, self._ranges = read_index(self.path)
        tree, self.treedef, self.paths, self.names = _structure(specs, target, str(self.path))
        self._shardings = _target_shardings(target, len(self.names))
        self.specs = [
            jax.ShapeDtypeStruct(specs[n].shape, specs[n].dtype, sharding=s) if s else specs[n]
            for n, s in zip(self.names, self._shardings, strict=True)
        ]
        self.kinds = stream.leaf_kinds(tree, self.paths, self.specs)
        self._maps: dict[pathlib.Path, mmap.mmap] = {}
        self._last: tuple[mmap.mmap, int, int] | None = None

    def _map(self, f: pathlib.Path) -> mmap.mmap:
        m = self._maps.get(f)
        if m is None:
            with open(f, "rb") as fh:
                m = self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def read(self, index: int) -> Any:
        """Leaf ``index``: a read-only NumPy view of the memory-mapped file (no copy).

        On the target's sharding (a jax.Array) when the source has a ``target``
        with shardings. The pages of the previously read leaf are released from
        this process (``madvise(MADV_DONTNEED)``; they stay in the page cache and
        a view still held re-reads them on access), so resident memory does not
        grow with the checkpoint.
        """
        name = self.names[index]
        spec = self.specs[index]
        m = self._map(self._files[name])
        begin, end = self._ranges[name]
        self._release()
        x = np.frombuffer(m, np.uint8, end - begin, begin).view(spec.dtype).reshape(spec.shape)
        self._last = (m, begin, end)
        s = self._shardings[index]
        if s is None:
            return x
        # Each device copies only its slice of the map (also across processes).
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    def _release(self) -> None:
        if self._last is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        m, begin, end = self._last
        self._last = None
        start = begin - begin % mmap.PAGESIZE
        if end > start and not m.closed:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Releases the memory maps (views still held keep their map alive)."""
        self._release()
        self._maps.clear()


def _target_shardings(target: Any, n: int) -> list:
    if target is None:
        return [None] * n
    return [getattr(x, "sharding", None) for x in jax.tree.leaves(target)]


def _structure(specs: dict[str, Any], target: Any, where: str):
    """``(tree of specs, treedef, paths, names)`` from flat specs (and ``target``)."""
    if target is None:
        tree = _names.nest(specs, where)
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [p for p, _ in flat]
        return tree, treedef, paths, _names.flat_names(paths)
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    paths = [p for p, _ in flat]
    names = _names.flat_names(paths)
    for name, (p, leaf) in zip(names, flat, strict=True):
        if name not in specs:
            raise ValueError(
                f"{where} has no tensor {name!r} for the target's leaf {_names.keystr(p)}."
            )
        s = specs[name]
        shape = getattr(leaf, "shape", None)
        if shape is not None and tuple(shape) != tuple(s.shape):
            raise ValueError(
                f"{where}: {name!r} has shape {tuple(s.shape)}, the target expects {tuple(shape)}."
            )
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.dtype(dtype) != s.dtype:
            raise ValueError(f"{where}: {name!r} has dtype {s.dtype}, the target expects {dtype}.")
    extra = sorted(set(specs) - set(names))
    if extra:
        raise ValueError(f"{where} has tensor {extra[0]!r}, which the target does not have.")
    return treedef.unflatten([specs[n] for n in names]), treedef, paths, names


def load_safetensors(path: str | os.PathLike, *, target: Any = None) -> Any:
    """Loads a safetensors checkpoint (one file, or a directory of shards) into a pytree.

    Args:
      path: A ``.safetensors`` file, or a directory with Hugging Face shards and
        ``model.safetensors.index.json`` (or one ``model.safetensors``).
      target: Optional pytree (arrays or :class:`jax.ShapeDtypeStruct`, possibly
        with a ``sharding``) whose leaves are matched by flat name
        (``a.b.0.c``); shapes and dtypes must agree, and every tensor must be
        used. Without it the result is nested dicts of string keys.

    Returns:
      The pytree of arrays (NumPy arrays, or jax.Arrays placed on the target's
      shardings), dtypes as stored (bf16 stays bf16).

    Raises:
      FileNotFoundError: if the checkpoint or one of its shards is missing.
      ValueError: on a corrupt header or index, or a mismatch with ``target``,
        naming the file and tensor.

    Examples:
      >>> import numpy as np, tempfile, os
      >>> from fusionjax import io
      >>> d = tempfile.mkdtemp()
      >>> p = os.path.join(d, "m.safetensors")
      >>> _ = io.save_safetensors({"a": {"w": np.ones(2, np.float32)}}, p)
      >>> io.load_safetensors(p)
      {'a': {'w': array([1., 1.], dtype=float32)}}
    """
    src = SafetensorsSource(path, target=target)

    def own(x):  # a copy the caller owns, not a view of the file
        return np.array(x) if isinstance(x, np.ndarray) else x

    try:
        return src.treedef.unflatten([own(src.read(i)) for i in range(len(src.names))])
    finally:
        src.close()


# -- writing ------------------------------------------------------------------


def shard_file_name(k: int, n: int) -> str:
    """Hugging Face's shard name: ``model-00001-of-00003.safetensors``."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(
    names: Sequence[str], specs: Sequence[Any], max_shard_bytes: int | None
) -> list[list[int]]:
    """Leaf indices per shard, in order, each at most ``max_shard_bytes`` (or one leaf)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, s in enumerate(specs):
        b = math.prod(s.shape) * np.dtype(s.dtype).itemsize
        if max_shard_bytes is not None and shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += b
    return shards


class _FileWriter:
    """One safetensors file with a precomputed header; tensors written at their offsets."""

    def __init__(self, path: pathlib.Path, items, metadata: dict | None):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, spec in items:
            b = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
            header[name] = {
                "dtype": dtype_code(spec.dtype, name),
                "shape": list(spec.shape),
                "data_offsets": [pos, pos + b],
            }
            self.offsets[name] = (pos, pos + b)
            pos += b
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.path = path
        self.total = self.data_start + pos
        self._header = struct.pack("<Q", len(raw)) + raw

    def create(self) -> None:
        with open(self.path, "wb") as f:
            f.write(self._header)
            f.truncate(self.total)

    def write(self, name: str, array: np.ndarray) -> None:
        begin, end = self.offsets[name]
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if data.size != end - begin:
            raise ValueError(f"{name!r}: {data.size} bytes for a slot of {end - begin}.")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view = memoryview(data)
            pos = self.data_start + begin
            while view:
                n = os.pwrite(fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            os.close(fd)


def _layout(out: pathlib.Path, names, specs, max_shard_bytes, metadata):
    """``(single file?, [(file name, writer items)])`` for an output path."""
    for n, s in zip(names, specs, strict=True):
        if not stream.is_array_like(s):
            raise ValueError(f"safetensors stores arrays only; the leaf {n!r} is {s!r}.")
        dtype_code(s.dtype, n)
    if out.suffix == ".safetensors":
        if max_shard_bytes is not None:
            raise ValueError(
                f"max_shard_bytes needs a directory output; {out} names a single .safetensors file."
            )
        return True, [(out.name, list(range(len(names))))]
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    shards = plan_shards(names, specs, max_shard_bytes)
    if len(shards) == 1:
        return False, [(SINGLE_FILE, shards[0])]
    return False, [(shard_file_name(k, len(shards)), idx) for k, idx in enumerate(shards)]


class SafetensorsSink(CheckpointSink):
    """A :class:`fusionjax.LeafSink` writing a safetensors checkpoint atomically.

    ``path`` ending in ``.safetensors`` is one file; otherwise a directory of
    shards of at most ``max_shard_bytes`` each with ``model.safetensors.index.json``
    (one shard: ``model.safetensors``, no index). Every file's header is computed
    from the specs up front and each leaf is written at its offset as it
    arrives, so memory holds one leaf. Committed by rename in :meth:`finish`.

    Several processes (``jax.distributed``): process 0 alone writes the files;
    every leaf must be whole on it (NumPy, or jax.Arrays on its own devices).
    Leaves sharded over several processes are refused, when ``like``'s specs
    say so up front and otherwise at their ``write``: gathering a huge leaf
    onto one host is what a sharded merge avoids, so write those to Orbax,
    where each process writes its own shards.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        like: Any,
        dtype: Any = None,
        max_shard_bytes: int | None = None,
        metadata: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(path, like=like, dtype=dtype, **kwargs)
        for name, spec in zip(self.names, self.specs, strict=True):
            sharding = getattr(spec, "sharding", None)
            if isinstance(sharding, jax.sharding.Sharding) and not sharding.is_fully_addressable:
                raise ValueError(
                    f"cannot write {self.path} as safetensors: the leaf {name!r} is sharded over "
                    "several processes (one process would have to gather it); write an Orbax "
                    "checkpoint instead (format='orbax')."
                )
        self._primary = _atomic.is_primary()
        self._single, shards = _layout(self.path, self.names, self.specs, max_shard_bytes, metadata)
        self._shards = shards
        self._leaf_file: dict[int, _FileWriter] = {}
        self._pool = None
        self._pending: list = []
        self._writers = []
        root = self.tmp / "out"
        for fname, idx in shards:
            w = _FileWriter(
                root / fname if not self._single else self.tmp / fname,
                [(self.names[i], self.specs[i]) for i in idx],
                metadata,
            )
            self._writers.append(w)
            for i in idx:
                self._leaf_file[i] = w

    def _start(self, tmp: pathlib.Path) -> None:
        if self.done or not self._primary:
            return  # resumed: the files exist with their headers
        if not self._single:
            (tmp / "out").mkdir()
        for w in self._writers:
            w.create()

    # Writes go to one background thread (pwrite releases the GIL), so writing
    # leaf i overlaps merging leaf i + 1; at most MAX_PENDING leaves wait.
    MAX_PENDING = 2

    def _write(self, index: int, value: Any) -> list[int]:
        if not self._primary:
            return []
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "fusionjax-safetensors")
        w = self._leaf_file[index]
        self._pending.append((index, self._pool.submit(w.write, self.names[index], value)))
        return self._drain(len(self._pending) - self.MAX_PENDING)

    def _drain(self, wait_for: int | None = None) -> list[int]:
        """Indices whose writes completed, after waiting for the oldest ``wait_for`` (if > 0)."""
        done = []
        while self._pending and (
            self._pending[0][1].done() or (wait_for is not None and wait_for > 0)
        ):
            i, fut = self._pending.pop(0)
            fut.result()  # re-raises a failed write here
            done.append(i)
            if wait_for is not None:
                wait_for -= 1
        return done

    def _flush(self) -> None:
        done = self._drain(len(self._pending))
        if done:
            self._record(done)

    def _finish(self, tmp: pathlib.Path) -> pathlib.Path:
        self._flush()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._single:
            return tmp / self._shards[0][0]
        if len(self._writers) > 1 and self._primary:
            total = sum(w.total - w.data_start for w in self._writers)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {self.names[i]: fname for fname, idx in self._shards for i in idx},
            }
            (tmp / "out" / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return tmp / "out"


    def abort(self) -> None:
        """Waits for the writes in flight, then closes as :meth:`CheckpointSink.abort`."""
        try:
            if self._started:
                self._flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            super().abort()


def save_safetensors(
    tree: Any,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> pathlib.Path:
    """Saves a pytree of arrays as safetensors, atomically.

    Leaves are named by their keys joined with ``"."``
    (``{"model": {"layers": [{"w": x}]}}`` → ``model.layers.0.w``); dtypes are
    kept exactly (bf16 stays bf16).

    Args:
      tree: A pytree of arrays whose key paths are dict keys, sequence indices
        or attributes, with no ``"."`` inside a key.
      path: A ``.safetensors`` file, or a directory for Hugging Face's sharded
        layout (``model-0000k-of-0000N.safetensors`` and
        ``model.safetensors.index.json``; ``model.safetensors`` when one shard
        holds everything).
      max_shard_bytes: Largest shard size in bytes (a larger single tensor gets
        a shard of its own); only with a directory ``path``. ``None``: one shard.
      metadata: String pairs stored in every file's ``__metadata__``.

    Returns:
      The output path.

    Raises:
      ValueError: if a leaf is not an array, a dtype cannot be stored, a key
        contains ``"."``, or two leaves get the same name (naming both paths).
      FileNotFoundError: if the parent directory of ``path`` does not exist.

    Examples:
      >>> import numpy as np, tempfile, os
      >>> from fusionjax import io
      >>> d = tempfile.mkdtemp()
      >>> _ = io.save_safetensors({"w": np.zeros((4, 4), np.float32)}, d, max_shard_bytes=32)
      >>> sorted(os.listdir(d))
      ['model.safetensors']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [x for _, x in flat]
    for p, x in flat:
        if not stream.is_array_like(x) or isinstance(x, jax.ShapeDtypeStruct):
            raise ValueError(
                "safetensors stores arrays only; the leaf at "
                f"{_names.keystr(p)} is {type(x).__name__}."
            )
    src = stream.TreeSource(tree)
    sink = SafetensorsSink(path, like=src, max_shard_bytes=max_shard_bytes, metadata=metadata)
    for i, x in enumerate(leaves):
        sink.write(i, x)
    return sink.finish()
