"""Factor types. Each file holds one idea; :func:`register_factor` adds a new one.

``beliefs.py`` is the protocol between a factor and a mean-field style engine: what a factor
is given (:class:`Beliefs`, Q as the factor sees it, with the run's :class:`MessageOptions`)
and what it returns (messages, possibly :class:`OnComponent`).
"""

from fieldlib.factors.base import Factor, Term, factor_types, register_factor
from fieldlib.factors.beliefs import Beliefs, FixedBeliefs, MessageOptions, OnComponent
from fieldlib.factors.chain import ChainPairwise
from fieldlib.factors.component import Component
from fieldlib.factors.frame_intent import FrameIntent
from fieldlib.factors.kernel_temporal import KernelTemporal
from fieldlib.factors.table import SparseTable, Table

__all__ = [
    "Factor",
    "Term",
    "register_factor",
    "factor_types",
    "Beliefs",
    "FixedBeliefs",
    "MessageOptions",
    "OnComponent",
    "Table",
    "SparseTable",
    "Component",
    "FrameIntent",
    "KernelTemporal",
    "ChainPairwise",
]
