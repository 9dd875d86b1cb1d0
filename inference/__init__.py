"""Inference engines (``fieldlib.inference``), interchangeable through one interface.

``get_engine(name, **options)`` builds one by name: ``exact`` (variable elimination),
``bruteforce`` (enumeration oracle).
"""

from .base import Engine, Result, engine_names, get_engine, register_engine
from .exact import BruteForce, VariableElimination
from .meanfield import MeanField

__all__ = [
    "Engine",
    "Result",
    "get_engine",
    "engine_names",
    "register_engine",
    "BruteForce",
    "VariableElimination",
    "MeanField",
]
