"""fusionjax: deep-model fusion in JAX, as pure functions over parameter pytrees."""

import importlib.metadata

from fusionjax import interop
from fusionjax import learned
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

try:
    __version__ = importlib.metadata.version("fusionjax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0.dev0"

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
    "apply_task_vector",
    "by_path",
    "chain",
    "gradient",
    "interop",
    "learned",
    "merge",
    "merging",
    "partition",
    "stack",
    "task_vector",
    "task_vectors",
    "unstack",
]
