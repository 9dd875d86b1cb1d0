"""What a factor is given and what it returns when an engine asks it for mean-field messages.

Mean-field (inference/meanfield.py) and the asynchronous engine to come (MATH.md §5) share
this protocol; it lives in the model core so that factors depend on no engine:

* :class:`Beliefs` is Q as a factor sees it (MATH.md §3: Q(X) = Π_v Q_v(x_v)): the
  probabilities of a variable or of every position of an array, their marginal on a block
  component, which messages the engine needs now, and the :class:`MessageOptions` of the
  run. An engine implements it with its own storage (``MeanFieldState``); :class:`FixedBeliefs`
  implements it over marginals keyed by name (a ``Result``'s), for losses and checks.
* A factor returns its messages as ``{item: message}`` (:data:`Messages`), a message being a
  tensor on the item's states or an :class:`OnComponent` on one block component; energies
  are ``(N,)`` tensors, per-position energies ``{array: (N, T)}``.

Options travel inside the Beliefs (``q.options``), never through module globals or engine
attributes, so two runs at once (two threads, or an asynchronous engine next to a
synchronous one) cannot see each other's settings.

:func:`expected_log_table` is the generic rule every factor falls back to (an einsum of a
log-table with the other variables' Q, 0 · (-inf) = 0); :func:`labelled_einsum` writes
einsums with any number of labels, so no factor is limited by an alphabet of letters.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fieldlib.variables import Variable, VariableArray

__all__ = [
    "Beliefs",
    "FixedBeliefs",
    "Message",
    "MessageOptions",
    "Messages",
    "OnComponent",
    "component_marginal",
    "expected_log_table",
    "labelled_einsum",
]


@dataclass(frozen=True)
class MessageOptions:
    """Settings of one run that change how factors compute their messages.

    Attributes:
        penalty: None (default): a message is -inf where Q puts positive probability on an
            impossible configuration. A number: ``value - penalty · p`` instead, p the
            probability Q puts on impossible configurations; an engine asks for these to
            choose the least impossible states of a variable whose every state is -inf.
        kernel_method: how KernelTemporal computes its kernel sums: ``"auto"``,
            ``"dense"``, ``"fft"`` or ``"banded"`` (fieldlib.kernels.temporal_sums).
    """

    penalty: float | None = None
    kernel_method: str = "auto"


@runtime_checkable
class Beliefs(Protocol):
    """Q as a factor sees it, for a batch of N (MATH.md §3).

    Attributes:
        batch: N, the leading axis of every tensor below.
        options: the run's :class:`MessageOptions`.
    """

    batch: int
    options: MessageOptions

    def probs(self, item: Variable | VariableArray) -> torch.Tensor:
        """Q of a Variable ``(N, d)`` or of every position of a VariableArray ``(N, T, d)``
        (padded positions: all-zero rows, so every expectation ignores them)."""
        ...

    def component_marginal(self, array: VariableArray, component: str | None) -> torch.Tensor:
        """``(N, T, D)``: Q of every position summed onto a block component
        (``Σ_{x: c(x) = u} Q_t(x)``); ``component=None`` gives Q itself."""
        ...

    def wants(self, item: Variable | VariableArray) -> bool:
        """Whether the engine needs a message to ``item`` now (a factor may skip the others)."""
        ...


class OnComponent:
    """A mean-field message given on one component of a block domain, e.g. on the 38 objects
    rather than the 471 frame states: the engine sums messages on the same component and
    gathers them onto the block's states once (MATH.md §3: µ acts on objects).

    Attributes:
        component: component name (None: the message is already on the states).
        message: ``([N,] [T,] D)`` on the component's values.
    """

    __slots__ = ("component", "message")

    def __init__(self, component: str | None, message: torch.Tensor):
        self.component = component
        self.message = message


#: One message: a tensor ``([N,] [T,] d)`` on the item's states, or an :class:`OnComponent`.
Message = torch.Tensor | OnComponent
#: What ``Factor.expected_messages`` returns: one message per Variable / VariableArray.
Messages = dict[Variable | VariableArray, Message]


def component_marginal(array: VariableArray, component: str | None,
                       q: torch.Tensor) -> torch.Tensor:
    """``(..., T, D)``: ``q (..., T, S)`` summed onto a block component of ``array``'s
    domain (``q`` itself when ``component`` is None)."""
    if component is None:
        return q
    index = array.domain.component(component).to(q.device)
    size = array.domain.components[component].size
    return q.new_zeros(*q.shape[:-1], size).index_add_(-1, index, q)


class FixedBeliefs:
    """:class:`Beliefs` over marginals keyed by array / variable name (a ``Result``'s
    ``marginals``): arrays ``([N,] T, d)``, stand-alone variables ``([N,] d)``; an unbatched
    marginal is shared by the N batch elements. Every message is wanted.

    Args:
        marginals: name -> marginal.
        batch: N.
        options: default ``MessageOptions()``.
    """

    def __init__(self, marginals: Mapping[str, torch.Tensor], batch: int,
                 options: MessageOptions | None = None):
        self.marginals, self.batch = marginals, int(batch)
        self.options = options or MessageOptions()

    def probs(self, item: Variable | VariableArray) -> torch.Tensor:
        p = self.marginals[item.name]
        k = 2 if isinstance(item, VariableArray) else 1
        return p.expand(self.batch, *p.shape[-k:]) if p.dim() == k else p

    def component_marginal(self, array: VariableArray, component: str | None) -> torch.Tensor:
        return component_marginal(array, component, self.probs(array))

    def wants(self, item: Variable | VariableArray) -> bool:
        return True


# -- einsum with any number of labels ------------------------------------------------------------
#: The letters of torch.einsum's string form, in the order labels take them.
_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def labelled_einsum(*args) -> torch.Tensor:
    """``torch.einsum`` in sublist form with labels of any kind and any number.

    Call as ``labelled_einsum(a, labels_a, b, labels_b, ..., out_labels)``: each labels a
    sequence of hashable labels (ints, strings, ...), ``...`` (Ellipsis) first for leading
    axes that broadcast. Labels become einsum letters in order of first appearance; up to 52
    distinct labels (torch.einsum's alphabet) this is one ``torch.einsum``. Beyond, the
    operands are multiplied one at a time as aligned broadcast tensors and each label is
    summed out as soon as no later operand and not the output holds it: same result, no
    limit on the number of labels (a table over 60 variables, most of cardinality 1).

    A label may appear once per operand. Raises ValueError for an odd argument list.
    """
    if len(args) % 2 != 1:
        raise ValueError("labelled_einsum(a, labels_a, ..., out_labels): odd argument count")
    subs = tuple(tuple(s) for s in args[1:-1:2])
    out = tuple(args[-1])
    equation = _equation(subs, out)
    if equation is not None:
        return torch.einsum(equation, *args[0:-1:2])
    return _broadcast_einsum(args[0:-1:2], subs, out)


@functools.lru_cache(maxsize=1024)
def _equation(subs: tuple, out: tuple) -> str | None:
    """torch.einsum's string for labelled operands (None beyond 52 distinct labels)."""
    ids: dict[Hashable, int] = {}
    for s in (*subs, out):
        for x in s:
            if x is not Ellipsis:
                ids.setdefault(x, len(ids))
    if len(ids) > len(_SYMBOLS):
        return None

    def spell(s):
        return "".join("..." if x is Ellipsis else _SYMBOLS[ids[x]] for x in s)

    return ",".join(spell(s) for s in subs) + "->" + spell(out)


def _broadcast_einsum(ops: Sequence[torch.Tensor], subs: Sequence[Sequence],
                      out: Sequence) -> torch.Tensor:
    """:func:`labelled_einsum` without torch.einsum: every operand laid out on all labels
    (size 1 where it lacks one) after a common broadcast lead, multiplied in turn."""
    labels: list = []
    for s in (*subs, out):
        for x in s:
            if x is not Ellipsis and x not in labels:
                labels.append(x)
    lead = torch.broadcast_shapes(*(t.shape[: t.dim() - len(s) + (Ellipsis in s)]
                                    for t, s in zip(ops, subs)))
    nl = len(lead)

    def aligned(t, s):
        own = [x for x in s if x is not Ellipsis]
        t = t.reshape((*[1] * (nl + len(own) - t.dim()), *t.shape))  # pad the lead to nl
        t = t.permute((*range(nl), *(nl + own.index(x) for x in labels if x in own)))
        sizes = iter(t.shape[nl:])
        return t.reshape((*t.shape[:nl], *(next(sizes) if x in own else 1 for x in labels)))

    later = [set().union(*(set(s) for s in subs[i + 1:]), out) for i in range(len(subs))]
    acc, alive = None, list(labels)
    for i, (t, s) in enumerate(zip(ops, subs)):
        acc = aligned(t, s) if acc is None else acc * aligned(t, s)
        done = [x for x in alive if x not in later[i]]
        if done:
            acc = acc.sum([nl + labels.index(x) for x in done], keepdim=True)
            alive = [x for x in alive if x not in done]
    keep = [nl + labels.index(x) for x in out if x is not Ellipsis]
    rest = [d for d in range(nl, acc.dim()) if d not in keep]  # summed: size 1
    acc = acc.permute((*range(nl), *keep, *rest))
    return acc.reshape(acc.shape[: nl + len(keep)])


def expected_log_table(table: torch.Tensor, qs: Sequence[torch.Tensor],
                       keep: int | None = None, penalty: float | None = None) -> torch.Tensor:
    """Expectation of a log-table under a product of distributions (MATH.md §3: the
    expected log-potential E_{Q_-v}[log φ | x_v] of a mean-field message, or E_Q[log φ]).

    Args:
        table: ``(..., d_1, ..., d_k)`` log-potentials; leading axes broadcast with the qs'.
        qs: k tensors ``(..., d_j)``: the distribution of each table axis.
        keep: an axis to keep (a mean-field message to that variable, its own q unused),
            or None for the full expectation.
        penalty: None: -inf where positive probability meets a -inf entry. A number:
            ``value - penalty · p`` there instead (:class:`MessageOptions`).

    Returns ``(..., d_keep)`` or ``(...)``. Convention 0 · (-inf) = 0: a configuration of
    zero probability contributes nothing; positive probability on a -inf entry gives -inf.
    """
    k = len(qs)
    lead = torch.broadcast_shapes(table.shape[: table.dim() - k],
                                  *(q.shape[:-1] for q in qs))
    others = [j for j in range(k) if j != keep]
    ops = [qs[j].expand(*lead, qs[j].shape[-1]) for j in others]
    full = table.expand(*lead, *table.shape[table.dim() - k:])
    neginf = torch.isneginf(full)
    if not bool(neginf.any()):
        return contract_table(full, None, ops, others, keep)
    return contract_table(full.masked_fill(neginf, 0.0), neginf.to(full.dtype), ops, others,
                          keep, penalty)


def contract_table(finite: torch.Tensor, impossible: torch.Tensor | None,
                   ops: Sequence[torch.Tensor], axes: Sequence[int], keep: int | None,
                   penalty: float | None = None, lead: Sequence = (Ellipsis,)) -> torch.Tensor:
    """The contraction inside :func:`expected_log_table`, on a table already split into its
    finite part and the indicator of its -inf entries (None: it has none).

    ``finite``, ``impossible``: ``(*lead, d_1, ..., d_k)``; ``ops[i]``: ``(*lead,
    d_axes[i])``. Returns ``Σ finite · Π ops`` over every table axis but ``keep``, with -inf
    (``penalty`` None) or ``-penalty · Σ impossible · Π ops`` where the ops give impossible
    entries positive probability. ``lead``: labels of the leading axes, ``...`` (any
    number, broadcast) by default; explicit labels spare einsum's ellipsis handling.
    """
    lead = list(lead)
    k = len(axes) + (keep is not None)
    table_labels = [*lead, *range(k)]
    out = [*lead] + ([keep] if keep is not None else [])
    args: list = []
    for j, q in zip(axes, ops):
        args += [q, [*lead, j]]
    value = labelled_einsum(finite, table_labels, *args, out)
    if impossible is None:
        return value
    imp = labelled_einsum(impossible, table_labels, *args, out)
    if penalty is not None:
        return value - penalty * imp
    return value.masked_fill(imp > 0, float("-inf"))
