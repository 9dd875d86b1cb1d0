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

#: Public names and the module each lives in. They load on first use (PEP 562), so that
#: ``import fieldlib.errors`` or the command line's ``--help`` do not import torch.
_LAZY = {
    **dict.fromkeys(["ChainPairwise", "Component", "Factor", "FrameIntent", "KernelTemporal",
                     "SparseTable", "Table", "Term", "factor_types", "register_factor"],
                    "fieldlib.factors"),
    "FactorGraph": "fieldlib.graph",
    **dict.fromkeys(["GaussianKernel", "KernelSum"], "fieldlib.kernels"),
    **dict.fromkeys(["BlockDomain", "Domain", "Variable", "VariableArray"],
                    "fieldlib.variables"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fieldlib' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    "ChainPairwise",
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
