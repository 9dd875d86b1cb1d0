"""Inference engines (``fieldlib.inference``), interchangeable through one interface.

``get_engine(name, **options)`` builds one by name or spec string: ``exact`` (variable
elimination), ``bruteforce`` (enumeration oracle), ``meanfield`` (structured mean-field),
``async`` (asynchronous mean-field with a message store, Algorithm 1; ``asynchronous_step``
is Algorithm 2), ``bp`` (loopy belief propagation, sum- and max-product);
``get_engine("meanfield[schedule=synchronous,damping=0.5]")`` sets options libDAI-style, and
``engine_options(name)`` lists what an engine takes.
"""

from .asynchronous import AsynchronousMeanField
from .asynchronous_step import AsyncStep, Coupled, asynchronous_step
from .base import (
    Engine,
    Option,
    Result,
    engine_names,
    engine_options,
    get_engine,
    parse_engine_spec,
    register_engine,
)
from .bp import BeliefPropagation, BPNotConvergedWarning
from .distribution import ApproximateFieldWarning, FieldDistribution
from .exact import BruteForce, VariableElimination
from .losses import closed_form_gradients, exact_nll, meanfield_loss
from .meanfield import InfeasibleWarning, MeanField, MeanFieldWarning, NotConvergedWarning
from .messages import Incoming, MessageStore, MessageStoreError, merge_state_dicts
from .messages_distributed import DistributedMessageStore
from .messages_replicated import ReplicatedMessageStore

__all__ = [
    "Engine",
    "Result",
    "Option",
    "get_engine",
    "engine_names",
    "engine_options",
    "parse_engine_spec",
    "register_engine",
    "BruteForce",
    "VariableElimination",
    "MeanField",
    "AsynchronousMeanField",
    "BeliefPropagation",
    "BPNotConvergedWarning",
    "FieldDistribution",
    "ApproximateFieldWarning",
    "asynchronous_step",
    "Coupled",
    "AsyncStep",
    "MeanFieldWarning",
    "InfeasibleWarning",
    "NotConvergedWarning",
    "exact_nll",
    "meanfield_loss",
    "closed_form_gradients",
    "MessageStore",
    "DistributedMessageStore",
    "ReplicatedMessageStore",
    "Incoming",
    "MessageStoreError",
    "merge_state_dicts",
]
