"""Public face of the knowledge-fusion testbed (see :mod:`fusionjax.testbed._knowledge`)."""

from fusionjax.testbed._knowledge import DOMAINS
from fusionjax.testbed._knowledge import KnowledgeConfig
from fusionjax.testbed._knowledge import KnowledgeTestbed
from fusionjax.testbed._knowledge import Teacher
from fusionjax.testbed._knowledge import bits_per_byte
from fusionjax.testbed._knowledge import bytes_to_unicode
from fusionjax.testbed._knowledge import load
from fusionjax.testbed._knowledge import window_bits_bytes

__all__ = [
    "DOMAINS",
    "KnowledgeConfig",
    "KnowledgeTestbed",
    "Teacher",
    "bits_per_byte",
    "bytes_to_unicode",
    "load",
    "window_bits_bytes",
]
