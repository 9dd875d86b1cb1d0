"""fieldlib: conditional random fields whose potentials come from neural networks.

The model API (variables, factors, the factor graph) lives here; engines live in
:mod:`fieldlib.inference`, concrete models in :mod:`fieldlib.models`.
"""

from fieldlib.errors import (
    CardinalityError,
    EvidenceError,
    FieldlibError,
    FormatError,
    InvalidPotentialError,
    ShapeError,
    TooLargeError,
    UnknownVariableError,
    UnsupportedQueryError,
    ZeroProbabilityError,
)
from fieldlib.factors import (
    Component,
    Factor,
    FrameIntent,
    KernelTemporal,
    SparseTable,
    Table,
    Term,
    factor_types,
    register_factor,
)
from fieldlib.graph import FactorGraph
from fieldlib.kernels import GaussianKernel, KernelSum
from fieldlib.variables import BlockDomain, Domain, Variable, VariableArray

__version__ = "0.1.0"

__all__ = [
    "FactorGraph",
    "Variable",
    "VariableArray",
    "Domain",
    "BlockDomain",
    "Factor",
    "Term",
    "Table",
    "SparseTable",
    "Component",
    "FrameIntent",
    "KernelTemporal",
    "GaussianKernel",
    "KernelSum",
    "register_factor",
    "factor_types",
    "FieldlibError",
    "ShapeError",
    "CardinalityError",
    "UnknownVariableError",
    "InvalidPotentialError",
    "EvidenceError",
    "ZeroProbabilityError",
    "TooLargeError",
    "UnsupportedQueryError",
    "FormatError",
]
