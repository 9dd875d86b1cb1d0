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
log-table with the other variables' Q, 0 · (-inf) = 0); :func:`contract` computes it one Q
at a time, each step one two-operand :func:`labelled_einsum`, which lays its operands out so
that torch runs it as one matrix product on views (no permute-copy of a large table), and
writes einsums with any number of labels, so no factor is limited by an alphabet of letters.
What does not depend on Q (a table split into its finite part and its -inf entries, a
kernel matrix) a factor computes once per run through ``q.constant``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from fieldlib.variables import Variable, VariableArray

__all__ = [
    "Beliefs",
    "FixedBeliefs",
    "Message",
    "MessageOptions",
    "Messages",
    "OnComponent",
    "any_neginf",
    "component_marginal",
    "contract",
    "expected_log_table",
    "labelled_einsum",
    "split_impossible",
    "with_impossible",
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

    def constant(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per run and kept under ``key`` for the rest of it: a
        value that does not depend on Q, only on a factor's tensors and the options (a
        log-table split into its finite part and its -inf entries, a kernel matrix). A
        factor keys it by itself, e.g. ``(self, "split")``, plus any option it depends on.
        Nothing outlives the run (a new run computes it again from the tensors as they are
        then). It is computed with grad mode on, so it stays differentiable in the factor's
        tensors when the engine uses it again for a differentiable ELBO."""
        ...


def cached_constant(store: dict, key: Hashable, compute: Callable[[], Any]) -> Any:
    """:meth:`Beliefs.constant` over the dict ``store`` (one per run)."""
    if key not in store:
        with torch.enable_grad():
            store[key] = compute()
    return store[key]


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
        self._constants: dict = {}

    def probs(self, item: Variable | VariableArray) -> torch.Tensor:
        p = self.marginals[item.name]
        k = 2 if isinstance(item, VariableArray) else 1
        return p.expand(self.batch, *p.shape[-k:]) if p.dim() == k else p

    def component_marginal(self, array: VariableArray, component: str | None) -> torch.Tensor:
        return component_marginal(array, component, self.probs(array))

    def wants(self, item: Variable | VariableArray) -> bool:
        return True

    def constant(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        return cached_constant(self._constants, key, compute)


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

    Two operands with explicit labels (no ``...``) are laid out for torch's one batched
    matrix product first (:func:`_pair_einsum`): labels that always travel together are
    merged into one (a view), and the operand order is chosen so that no large operand is
    permuted and copied.

    A label may appear once per operand. Raises ValueError for an odd argument list.
    """
    if len(args) % 2 != 1:
        raise ValueError("labelled_einsum(a, labels_a, ..., out_labels): odd argument count")
    subs = tuple(tuple(s) for s in args[1:-1:2])
    out = tuple(args[-1])
    if len(subs) == 2 and not any(x is Ellipsis for s in (*subs, out) for x in s):
        return _pair_einsum(args[0], subs[0], args[2], subs[1], out)
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


def _pair_einsum(a: torch.Tensor, sa: tuple, b: torch.Tensor, sb: tuple,
                 out: tuple) -> torch.Tensor:
    """One two-operand einsum, laid out so that torch runs it as one batched matrix product on
    views of the operands.

    torch.einsum contracts two operands as ``bmm(first (batch, own, summed), second (batch,
    summed, own))``, permuting each into that layout: a permutation that is not a view (two
    summed labels in another order, e.g. ``ntd,ntdi->ni``) copies the whole operand, and a
    second operand with no label of its own (a matrix times a vector) runs several times
    slower than the same product with the vector first. So: (1) labels that are adjacent and
    in the same order in every operand and the output that holds them (e.g. frames x states
    of a per-frame table) are merged into one label by a view; (2) an operand with no label
    of its own goes first, otherwise the one owning the output's first own label; (3) two
    operands with the same labels (a product summed over some of them) are multiplied and
    summed, not batched into matrix products of one row. Same result as ``torch.einsum`` up
    to the order of floating-point sums. The layout is planned once per labels and shapes."""
    plan = _pair_plan(sa, sb, out, tuple(a.shape), tuple(b.shape))
    merged, plain = plan
    if merged is not None:
        view_a, view_b, step, shape = merged
        try:
            a2, b2 = a.view(view_a), b.view(view_b)
        except RuntimeError:  # a merged run is not one block of memory here
            pass
        else:
            return _pair_step(a2, b2, step).reshape(shape)
    return _pair_step(a, b, plain)


def _pair_step(a: torch.Tensor, b: torch.Tensor, step: tuple) -> torch.Tensor:
    kind, arg = step
    if kind == "mul":  # same labels: multiply (b permuted to a's order), sum, permute
        perm_b, summed, perm_out = arg
        r = a * b.permute(perm_b)
        return (r.sum(summed) if summed else r).permute(perm_out)
    swap, equation, labels = arg
    if swap:
        a, b = b, a
    if equation is None:
        return _broadcast_einsum((a, b), labels[:2], labels[2])
    return torch.einsum(equation, a, b)


@functools.lru_cache(maxsize=4096)
def _pair_plan(sa: tuple, sb: tuple, out: tuple, shape_a: tuple, shape_b: tuple):
    """``(merged, plain)``: the step with merged label runs (``(view_a, view_b, step, out
    shape)``, None when nothing merges) and the step without (see :func:`_pair_einsum`)."""
    sizes: dict = {}
    for shape, s in ((shape_a, sa), (shape_b, sb)):
        for x, n in zip(s, shape):
            sizes.setdefault(x, set()).add(n)
    seqs = (sa, sb, out)

    def joins(x, y):  # y right after x wherever either is, one size (no broadcast)
        if len(sizes[x]) > 1 or len(sizes[y]) > 1:
            return False
        return all((x in s) == (y in s) and (x not in s or s.index(y) == s.index(x) + 1)
                   for s in seqs)

    merged: dict = {}  # label -> the first label of the run it is merged into
    for s in seqs:
        for x, y in zip(s, s[1:]):
            if y not in merged and joins(x, y):
                merged[y] = merged.get(x, x)

    def runs(shape, s):
        dims: list = []
        for x, n in zip(s, shape):
            if x in merged:
                dims[-1] *= n
            else:
                dims.append(n)
        return tuple(dims), tuple(x for x in s if x not in merged)

    plain = _pair_order(sa, sb, out)
    if not merged:
        return None, plain
    (va, la), (vb, lb) = runs(shape_a, sa), runs(shape_b, sb)
    lo = tuple(x for x in out if x not in merged)
    return (va, vb, _pair_order(la, lb, lo), tuple(max(sizes[x]) for x in out)), plain


def _pair_order(sa: tuple, sb: tuple, out: tuple) -> tuple:
    own_a = [x for x in sa if x not in sb]
    own_b = [x for x in sb if x not in sa]
    if not own_a and not own_b:
        kept = [x for x in sa if x in out]
        return "mul", (tuple(sb.index(x) for x in sa),
                       tuple(i for i, x in enumerate(sa) if x not in out),
                       tuple(kept.index(x) for x in out))
    first_own = next((x for x in out if x in own_a or x in own_b), None)
    swap = bool((own_a and not own_b) or (own_a and own_b and first_own in own_b))
    subs = (sb, sa) if swap else (sa, sb)
    return "einsum", (swap, _equation(subs, out), (*subs, out))


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
    finite, impossible = split_impossible(full)
    return contract_table(finite, impossible, ops, others, keep, penalty)


def any_neginf(table: torch.Tensor) -> bool:
    """Whether ``table`` has a -inf entry (one reduction, several times faster than
    ``isneginf(table).any()`` on CPU; log-potentials hold no NaN)."""
    return table.numel() > 0 and bool(table.detach().amin() == float("-inf"))


def split_impossible(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(finite, impossible)``: ``table`` with its -inf entries replaced by 0, and their
    indicator (1 there, 0 elsewhere, in the table's dtype); ``(table, None)`` when it has
    none (no copy)."""
    if not any_neginf(table):
        return table, None
    neginf = torch.isneginf(table)
    return table.masked_fill(neginf, 0.0), neginf.to(table.dtype)


def with_impossible(value: torch.Tensor, impossible: torch.Tensor | None,
                    penalty: float | None = None) -> torch.Tensor:
    """An expectation of a split table's finite part, ``value``, with the expectation of its
    -inf indicator, ``impossible`` (the probability put on impossible configurations),
    applied: -inf where it is positive (``penalty`` None), ``value - penalty · impossible``
    otherwise (:class:`MessageOptions`). ``impossible`` None: ``value``."""
    if impossible is None:
        return value
    if penalty is not None:
        return value - penalty * impossible
    return value.masked_fill(impossible > 0, float("-inf"))


def contract(table: torch.Tensor, labels: Sequence, ops: Sequence[tuple], out: Sequence
             ) -> torch.Tensor:
    """``Σ table · Π ops`` over every label not in ``out``, one operand at a time.

    ``labels``: one per axis of ``table``; ``ops``: ``(tensor, labels)`` pairs (a Q, or a
    product of Qs); ``out``: the result's labels, each held by ``table`` or an op. Each step
    is one two-operand :func:`labelled_einsum` (a matrix product on views), summing every
    label no later op and not the output holds; labels an op brings in go first. With no
    op, ``table`` permuted (and summed) to ``out``."""
    acc, have = table, list(labels)
    if not ops:
        return labelled_einsum(acc, have, list(out))
    for i, (t, own) in enumerate(ops):
        if i == len(ops) - 1:
            keep = list(out)
        else:
            later = set(out).union(*(set(lab) for _, lab in ops[i + 1:]))
            keep = ([x for x in own if x not in have and x in later]
                    + [x for x in have if x in later])
        acc, have = labelled_einsum(acc, have, t, list(own), keep), keep
    return acc


def contract_table(finite: torch.Tensor, impossible: torch.Tensor | None,
                   ops: Sequence[torch.Tensor], axes: Sequence[int], keep: int | None,
                   penalty: float | None = None, lead: Sequence = (Ellipsis,)) -> torch.Tensor:
    """The contraction inside :func:`expected_log_table`, on a table already split into its
    finite part and the indicator of its -inf entries (None: it has none;
    :func:`split_impossible`).

    ``finite``, ``impossible``: ``(*lead, d_1, ..., d_k)``; ``ops[i]``: ``(*lead,
    d_axes[i])``. Returns ``Σ finite · Π ops`` over every table axis but ``keep``, with -inf
    (``penalty`` None) or ``-penalty · Σ impossible · Π ops`` where the ops give impossible
    entries positive probability (:func:`with_impossible`). ``lead``: labels of the leading
    axes, ``...`` (any number, broadcast) by default. The ops are contracted one at a time
    (:func:`contract`).
    """
    lead = list(lead)
    k = len(axes) + (keep is not None)
    if lead == [Ellipsis]:
        nl = finite.dim() - k
        if all(q.dim() == nl + 1 for q in ops):  # one label per leading axis
            lead = [("lead", i) for i in range(nl)]
    table_labels = [*lead, *range(k)]
    out = [*lead] + ([keep] if keep is not None else [])
    if Ellipsis in lead:
        args: list = []
        for j, q in zip(axes, ops):
            args += [q, [*lead, j]]
        value = labelled_einsum(finite, table_labels, *args, out)
        imp = None if impossible is None else labelled_einsum(impossible, table_labels,
                                                              *args, out)
        return with_impossible(value, imp, penalty)
    pairs = [(q, [*lead, j]) for j, q in zip(axes, ops)]
    value = contract(finite, table_labels, pairs, out)
    imp = None if impossible is None else contract(impossible, table_labels, pairs, out)
    return with_impossible(value, imp, penalty)
