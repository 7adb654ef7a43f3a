"""fusionjax: deep-model fusion in JAX, as pure functions over parameter pytrees.

``import fusionjax`` loads the core (:func:`merge`, :func:`chain`, the task-vector
helpers) and :mod:`fusionjax.merging`, which need only jax and numpy. The other
subpackages are attributes too, imported on first use (PEP 562), most because they load
flax, optax, orbax or scikit-learn: ``fusionjax.alignment``, ``fusionjax.learned``,
``fusionjax.logits``, ``fusionjax.decoding``, ``fusionjax.distill``, ``fusionjax.interop``,
``fusionjax.io``, ``fusionjax.zoo``, ``fusionjax.testbed``, ``fusionjax.demo`` and
``fusionjax.cli``.
"""

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

from fusionjax import merging
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import LeafInfo
from fusionjax._src.base import LeafValue
from fusionjax._src.base import Merger
from fusionjax._src.base import Params
from fusionjax._src.base import Stacked
from fusionjax._src.base import Statistic
from fusionjax._src.base import Step
from fusionjax._src.base import TaskVectorFn
from fusionjax._src.merge import chain
from fusionjax._src.merge import merge
from fusionjax._src.per_leaf import by_path
from fusionjax._src.per_leaf import gradient
from fusionjax._src.per_leaf import partition
from fusionjax._src.stream import LeafSink
from fusionjax._src.stream import LeafSource
from fusionjax._src.stream import TreeSink
from fusionjax._src.stream import TreeSource
from fusionjax._src.tree import apply_task_vector
from fusionjax._src.tree import stack
from fusionjax._src.tree import task_vector
from fusionjax._src.tree import task_vectors
from fusionjax._src.tree import unstack

if TYPE_CHECKING:  # the lazy subpackages, for type checkers and IDEs
    from fusionjax import alignment
    from fusionjax import cli
    from fusionjax import decoding
    from fusionjax import demo
    from fusionjax import distill
    from fusionjax import interop
    from fusionjax import io
    from fusionjax import learned
    from fusionjax import logits
    from fusionjax import testbed
    from fusionjax import zoo

try:
    __version__ = importlib.metadata.version("fusionjax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0.dev0"

_LAZY_SUBPACKAGES = (
    "alignment",
    "cli",
    "decoding",
    "demo",
    "distill",
    "interop",
    "io",
    "learned",
    "logits",
    "testbed",
    "zoo",
)


def __getattr__(name: str):
    # Called only for names not yet in the module: importing a subpackage binds it here.
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))


__all__ = [
    "ArrayLike",
    "LeafInfo",
    "LeafSink",
    "LeafSource",
    "LeafValue",
    "Merger",
    "Params",
    "Stacked",
    "Statistic",
    "Step",
    "TaskVectorFn",
    "TreeSink",
    "TreeSource",
    "alignment",
    "apply_task_vector",
    "by_path",
    "chain",
    "cli",
    "decoding",
    "demo",
    "distill",
    "gradient",
    "interop",
    "io",
    "learned",
    "logits",
    "merge",
    "merging",
    "partition",
    "stack",
    "task_vector",
    "task_vectors",
    "testbed",
    "unstack",
    "zoo",
]
