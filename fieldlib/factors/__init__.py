"""Factor types. Each file holds one idea; :func:`register_factor` adds a new one."""

from fieldlib.factors.base import Factor, Term, factor_types, register_factor
from fieldlib.factors.component import Component
from fieldlib.factors.frame_intent import FrameIntent
from fieldlib.factors.kernel_temporal import KernelTemporal
from fieldlib.factors.table import SparseTable, Table

__all__ = [
    "Factor",
    "Term",
    "register_factor",
    "factor_types",
    "Table",
    "SparseTable",
    "Component",
    "FrameIntent",
    "KernelTemporal",
]
