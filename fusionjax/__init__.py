"""fusionjax: deep-model fusion in JAX, as pure functions over parameter pytrees."""

import importlib.metadata

from fusionjax import interop
from fusionjax import learned
from fusionjax import merging
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Merger
from fusionjax._src.base import Params
from fusionjax._src.base import Stacked
from fusionjax._src.base import Step
from fusionjax._src.base import TaskVectorFn
from fusionjax._src.merge import chain
from fusionjax._src.merge import merge
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
    "Merger",
    "Params",
    "Stacked",
    "Step",
    "TaskVectorFn",
    "apply_task_vector",
    "chain",
    "interop",
    "learned",
    "merge",
    "merging",
    "stack",
    "task_vector",
    "task_vectors",
    "unstack",
]
