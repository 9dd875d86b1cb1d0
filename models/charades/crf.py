"""The Charades CRF: a batch of head outputs becomes fieldlib factors (MATH.md §1-§3, §7, §9).

The frame variable X_t = (C, O, A, P, S) is ONE block variable over the allowed tuples, the
set B of (c, o, a, p) seen in training times the scenes S (MATH.md §1). Its states are laid
out B-major, scene fastest:

    state index = b * S + s        b: row of ``StateSpace.states``, s: scene index

and its :class:`~fieldlib.variables.BlockDomain` has six components, in this order:

    c  category  (n_classes)        o  object   (O)          a  verb  (V)
    p  progress  (P = 3, or 1)      s  scene    (S)          q  object x progress, o * P + p

``q`` is a derived column (it adds no state): the released code's φXI and µ act on object x
progress (MATH.md §9), and FrameIntent / KernelTemporal act on one component column, so
``component="object_progress"`` puts them on ``q`` (D = O * P); ``"object"`` (the paper,
the default) on ``o`` (D = O).

Heads (any object with these attributes, or a mapping), leading dims ``(N, T)`` for whole
videos (:func:`video_graph`) or ``(B,)`` for sampled frames (:func:`frame_inputs`):
``phi_op (.., O, P)``, ``phi_ap (.., V, P)``, ``phi_os (.., O, S)`` or None, ``phi_b (..,
|B|)`` (one value per row of B), ``phi_xi (.., D, N_I)`` or None. φX (MATH.md §2)
is the sum of four :class:`~fieldlib.factors.Component` factors; φXI is a
:class:`~fieldlib.factors.FrameIntent`, φXX a :class:`~fieldlib.factors.KernelTemporal`:
fieldlib's own factors and engines do all the work, nothing is recomputed here.

Progress ablation (paper Fig. 8): :func:`collapse_progress` gives a state space with P = 1
(progress column 0, states unique over (c, o, a)); every function here then expects heads
with P = 1 and ``phi_b`` over the collapsed rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors import Component, FrameIntent, KernelTemporal
from fieldlib.factors.component import block_table_sum
from fieldlib.graph import FactorGraph
from fieldlib.variables import BlockDomain, Variable, VariableArray, integer_tensor

from .statespace import N_PROGRESS, StateSpace

__all__ = ["COMPONENT_COLUMNS", "SIGMA_SECONDS", "FrameLayout", "VideoCRF", "class_scores",
           "collapse_progress", "component_column", "frame_domain", "frame_inputs",
           "frame_layout", "frame_state", "progress_size", "video_graph"]

#: The block column φXI and µ act on, per ``component`` option (MATH.md §2, §9).
COMPONENT_COLUMNS = (("object", "o"), ("object_progress", "q"))
#: The paper's kernel width: σ = 150 frames at 24 fps, in seconds (MATH.md §2).
SIGMA_SECONDS = 150.0 / 24.0
_HEADS = ("phi_op", "phi_ap", "phi_os", "phi_b", "phi_xi")


# -- the frame state layout -------------------------------------------------------------------
def progress_size(state_space: StateSpace) -> int:
    """P: 1 for a state space made by :func:`collapse_progress` (progress column all 0 and
    ``lookup`` the same row for every progress of a class), else 3."""
    states, lookup = np.asarray(state_space.states), np.asarray(state_space.lookup)
    collapsed = (len(states) > 0 and bool((states[:, 3] == 0).all())
                 and bool((lookup == lookup[:, :1]).all()))
    return 1 if collapsed else N_PROGRESS


def collapse_progress(state_space: StateSpace) -> StateSpace:
    """The "no progress" ablation's state space (paper Fig. 8): P = 1.

    States are the distinct (c, o, a) of B with progress 0, sorted (``np.unique`` order, the
    same rows as the network's ``progress=False`` heads); ``counts`` summed over progress;
    ``lookup`` int64 [n_classes, 3] maps every (c, p) of a class in B to its collapsed row
    (-1 for classes not in B), so datasets' ``lookup[c, p]`` labels keep working. A state
    space that is already collapsed is returned as it is."""
    if progress_size(state_space) == 1:
        return state_space
    states = np.asarray(state_space.states, dtype=np.int64).copy()
    states[:, 3] = 0
    rows, inverse = np.unique(states, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse, weights=np.asarray(state_space.counts, dtype=np.float64),
                         minlength=len(rows)).round().astype(np.int64)
    lookup = np.asarray(state_space.lookup)
    # one row per class: with a class mapping, (o, a) follow from c
    row_of_class = np.full(lookup.shape[0], -1, dtype=np.int64)
    row_of_class[rows[:, 0]] = np.arange(len(rows))
    lookup = np.repeat(row_of_class[:, None], lookup.shape[1], axis=1)
    return StateSpace(state_space.labels, rows.astype(np.int64), counts, state_space.scenes,
                      lookup, state_space.fps)


@dataclass(frozen=True, eq=False)
class FrameLayout:
    """The frame variable of a state space (module docstring): build once with
    :func:`frame_layout` and pass it wherever a state space is taken, to skip rebuilding.

    Attributes:
        state_space: the :class:`StateSpace`.
        domain: the :class:`BlockDomain` (c, o, a, p, s, q) over ``|B| * S`` states.
        configs: ``LongTensor (|B|, 4)``: the (c, o, a, p) rows of B (φ_b's configs).
        classes: ``LongTensor (|B| * S,)``: the class of each frame state.
        n_progress: P (3, or 1 after :func:`collapse_progress`).
    """

    state_space: StateSpace
    domain: BlockDomain
    configs: torch.Tensor
    classes: torch.Tensor
    n_progress: int

    @property
    def n_states(self) -> int:
        """|B|."""
        return len(self.configs)

    @property
    def n_scenes(self) -> int:
        return self.domain.components["s"].size

    @property
    def size(self) -> int:
        """|B| * S: the states of one frame."""
        return self.domain.size

    @property
    def n_objects(self) -> int:
        return self.domain.components["o"].size

    @property
    def n_verbs(self) -> int:
        return self.domain.components["a"].size

    @property
    def n_classes(self) -> int:
        return self.domain.components["c"].size

    def component(self, component: str) -> tuple[torch.Tensor, int]:
        """``(LongTensor (|B| * S,), D)``: each frame state's value of ``component``
        (``"object"``: o, D = O; ``"object_progress"``: o * P + p, D = O * P)."""
        column = component_column(component)
        return self.domain.component(column), self.domain.components[column].size


def component_column(component: str) -> str:
    """The block column of a ``component`` option; FieldlibError for an unknown one."""
    for name, column in COMPONENT_COLUMNS:
        if component == name:
            return column
    raise FieldlibError(f"component must be one of {[n for n, _ in COMPONENT_COLUMNS]}, "
                        f"got {component!r}")


def frame_layout(state_space: StateSpace | FrameLayout) -> FrameLayout:
    """The :class:`FrameLayout` of a state space (a layout is returned as it is).

    Raises FieldlibError: a state space without a class -> object/verb mapping (use
    ``LabelSpace.with_derived_mapping()``), with no state or no scene."""
    if isinstance(state_space, FrameLayout):
        return state_space
    if not isinstance(state_space, StateSpace):
        raise FieldlibError(f"expected a StateSpace or a FrameLayout, got "
                            f"{type(state_space).__name__}")
    labels = state_space.labels
    if not labels.has_mapping:
        raise FieldlibError("the Charades CRF needs a class -> object/verb mapping (frames "
                            "over (c, o, a, p)); this state space is category-only: build it "
                            "with LabelSpace.with_derived_mapping() or the mapping files")
    states = torch.as_tensor(np.asarray(state_space.states, dtype=np.int64))
    n_b, n_s = len(states), state_space.n_scenes
    if n_b == 0 or n_s == 0:
        raise FieldlibError(f"the state space has {n_b} states and {n_s} scenes; a frame "
                            f"needs at least one of each")
    p = progress_size(state_space)
    o_size = len(labels.objects)
    b = states.repeat_interleave(n_s, 0)  # state b * S + s: B-major, scene fastest
    s = torch.arange(n_s).repeat(n_b)
    q = b[:, 1] * p + b[:, 3]
    tuples = torch.cat([b, s[:, None], q[:, None]], 1)
    domain = BlockDomain({"c": labels.n_classes, "o": o_size, "a": len(labels.verbs),
                          "p": p, "s": n_s, "q": o_size * p}, tuples)
    return FrameLayout(state_space, domain, states, b[:, 0].contiguous(), p)


def frame_domain(state_space: StateSpace | FrameLayout) -> BlockDomain:
    """The frame variable's :class:`BlockDomain`: components (c, o, a, p, s, q), state index
    ``b * S + s`` (module docstring)."""
    return frame_layout(state_space).domain


def frame_state(state, scene, state_space: StateSpace | FrameLayout) -> torch.Tensor:
    """Frame states ``b * S + s`` from rows of B and scene indices, ``LongTensor`` of the
    broadcast shape; -1 where either is -1 (no label, padding, unknown scene).

    Args:
        state: ``(...)`` rows of ``StateSpace.states`` (a dataset's ``state``), -1 allowed.
        scene: ``(...)``, or fewer leading dims (e.g. ``(N,)`` per video for ``state (N,
            T)``): broadcast from the left.

    Raises FieldlibError: non-integers, a state outside -1..|B|-1 or a scene outside
    -1..S-1 (naming which)."""
    layout = frame_layout(state_space)
    b = integer_tensor(state, "frame_state: state")
    s = integer_tensor(scene, "frame_state: scene").to(b.device)
    if s.dim() < b.dim():
        s = s.reshape(*s.shape, *(1,) * (b.dim() - s.dim()))
    for what, t, top in (("state", b, layout.n_states), ("scene", s, layout.n_scenes)):
        bad = (t < -1) | (t >= top)
        if bool(bad.any()):
            raise FieldlibError(f"frame_state: {what} {int(t[bad][0])} is outside -1..{top - 1}")
    try:
        b, s = torch.broadcast_tensors(b, s)
    except RuntimeError:
        raise ShapeError(f"frame_state: state {tuple(b.shape)} and scene {tuple(s.shape)} "
                         f"do not broadcast") from None
    return torch.where((b >= 0) & (s >= 0), b * layout.n_scenes + s, b.new_full((), -1))


def class_scores(q: torch.Tensor, state_space: StateSpace | FrameLayout) -> torch.Tensor:
    """``(..., n_classes)``: Q of each frame summed over the states of each class, i.e. over
    progress and scene (MATH.md §7, §9); 0 for a class not in B. Differentiable.

    Args:
        q: ``(..., |B| * S)`` frame marginals (e.g. ``result.marginals["x"]`` (N, T, .)).

    Raises ShapeError when the last axis is not ``|B| * S``."""
    layout = frame_layout(state_space)
    if q.dim() == 0 or q.shape[-1] != layout.size:
        raise ShapeError(f"class_scores: q must have shape (..., |B| * S) = (..., "
                         f"{layout.n_states} * {layout.n_scenes}), got {tuple(q.shape)}")
    per_b = q.reshape(*q.shape[:-1], layout.n_states, layout.n_scenes).sum(-1)
    index = layout.configs[:, 0].to(q.device)
    return q.new_zeros(*q.shape[:-1], layout.n_classes).index_add(-1, index, per_b)


# -- heads --------------------------------------------------------------------------------------
def _heads(heads, layout: FrameLayout, lead_names: tuple[str, ...], component: str,
           use_intent: bool, n_intents) -> dict:
    """The head tensors, shapes checked: ``{name: Tensor or None}``; phi_xi None unless
    ``use_intent``."""
    def get(name):
        if isinstance(heads, Mapping):
            return heads.get(name)
        return getattr(heads, name, None)

    out = {}
    for name in _HEADS:
        value = get(name)
        if value is not None and not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise FieldlibError(f"heads.{name} must be a tensor ({exc})") from None
        out[name] = value
    for name in ("phi_op", "phi_ap", "phi_b"):
        if out[name] is None:
            raise FieldlibError(f"heads.{name} is missing (heads need phi_op, phi_ap, phi_b; "
                                f"phi_os and phi_xi may be None)")
    k = len(lead_names)
    first = out["phi_op"]
    if first.dim() != k + 2:
        raise ShapeError(f"heads.phi_op must have shape ({', '.join(lead_names)}, O, P), "
                         f"got {tuple(first.shape)}")
    lead = tuple(first.shape[:k])
    p, d_size = layout.n_progress, layout.component(component)[1]
    core = {"phi_op": (("O", layout.n_objects), ("P", p)),
            "phi_ap": (("V", layout.n_verbs), ("P", p)),
            "phi_os": (("O", layout.n_objects), ("S", layout.n_scenes)),
            "phi_b": (("|B|", layout.n_states),)}
    if use_intent:
        if out["phi_xi"] is None:
            raise FieldlibError("heads.phi_xi is None but use_intent=True; give φXI or pass "
                                "use_intent=False (the no-intent ablation)")
        xi = out["phi_xi"]
        n_i = int(xi.shape[-1]) if n_intents is None else int(n_intents)
        d_name = "O" if component == "object" else "O*P"
        core["phi_xi"] = ((f"D={d_name}", d_size), ("N_I", n_i))
        if n_i < 1:
            raise ShapeError(f"heads.phi_xi has {n_i} intents; at least one is needed")
    else:
        out["phi_xi"] = None
    for name, axes in core.items():
        t = out[name]
        if t is None:
            continue
        want = lead + tuple(size for _, size in axes)
        if tuple(t.shape) != want:
            names = ", ".join((*lead_names, *(a for a, _ in axes)))
            hint = (f"; for component 'object_progress' D = O*P = {layout.n_objects * p}"
                    if name == "phi_xi" and component == "object" else "")
            if name in ("phi_op", "phi_ap") and t.dim() == len(want) and t.shape[-1] == 1 \
                    and p != 1:
                hint = "; for the no-progress ablation (P = 1) use collapse_progress(state_space)"
            raise ShapeError(f"heads.{name} must have shape ({names}) = {want}, got "
                             f"{tuple(t.shape)}{hint}")
    return out


def _frame_factors(target, h: dict, layout: FrameLayout) -> list:
    """φX (MATH.md §2): φ(o,p) + φ(a,p) [+ φ(o,s)] + φ(c,o,a,p) (sparse on B) as Component
    factors on ``target`` (a frame Variable or the frames' VariableArray)."""
    factors = [Component(target, ("o", "p"), h["phi_op"], name="phi_op"),
               Component(target, ("a", "p"), h["phi_ap"], name="phi_ap")]
    if h["phi_os"] is not None:
        factors.append(Component(target, ("o", "s"), h["phi_os"], name="phi_os"))
    factors.append(Component(target, ("c", "o", "a", "p"), h["phi_b"], configs=layout.configs,
                             name="phi_b"))
    return factors


def _check_mu(mu, layout: FrameLayout, component: str) -> torch.Tensor:
    if mu is None:
        raise FieldlibError("mu is None but use_temporal=True; give µ (D, D) or pass "
                            "use_temporal=False (the no-temporal ablation)")
    mu = mu if isinstance(mu, torch.Tensor) else torch.as_tensor(mu)
    d = layout.component(component)[1]
    if tuple(mu.shape[-2:]) != (d, d) or mu.dim() not in (2, 3):
        other = "object_progress" if component == "object" else "object"
        d_other = layout.component(other)[1]
        raise ShapeError(f"mu must have shape (D, D) = ({d}, {d}) for component "
                         f"{component!r} (component {other!r}: ({d_other}, {d_other})), "
                         f"got {tuple(mu.shape)}")
    return mu


# -- whole videos -----------------------------------------------------------------------------
@dataclass
class VideoCRF:
    """A batch of whole videos as one factor graph (:func:`video_graph`).

    Attributes:
        graph: the :class:`FactorGraph` (batch N).
        frames: the frames' :class:`VariableArray` ``"x"`` (T positions, ``lengths`` when
            padded), states ``b * S + s``.
        intent: the intent Variable ``"I"`` (N_I states), or None (no-intent ablation).
        layout: the :class:`FrameLayout`.
        component: ``"object"`` or ``"object_progress"``.
    """

    graph: FactorGraph
    frames: VariableArray
    intent: Variable | None
    layout: FrameLayout
    component: str

    def labels(self, state, scene) -> dict:
        """``{"x": (N, T) frame states}`` from rows of B and scenes (:func:`frame_state`):
        evidence / labels for engines and losses (-1 only on padded frames)."""
        return {self.frames.name: frame_state(state, scene, self.layout)}

    def class_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``(N, T, n_classes)`` class marginals of frame marginals ``q (N, T, |B| S)``."""
        return class_scores(q, self.layout)


def _lengths(lengths, mask, n: int, t: int):
    """``LongTensor (N,)`` or None from ``lengths`` and/or a prefix ``mask (N, T)``."""
    from_mask = None
    if mask is not None:
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool or tuple(m.shape) != (n, t):
            raise ShapeError(f"mask must be a bool tensor of shape (N, T) = ({n}, {t}), got "
                             f"{m.dtype} {tuple(m.shape)}")
        from_mask = m.sum(-1).cpu()
        if not bool((m.cpu() == (torch.arange(t) < from_mask[:, None])).all()):
            raise ShapeError("mask must mark a prefix of each video (real frames first, then "
                             "padding)")
    if lengths is None:
        return from_mask
    lengths = integer_tensor(lengths, "lengths").cpu()
    if tuple(lengths.shape) != (n,):
        raise ShapeError(f"lengths must have shape (N,) = ({n},), got {tuple(lengths.shape)}")
    if from_mask is not None and not bool((from_mask == lengths).all()):
        raise ShapeError(f"lengths {lengths.tolist()} disagree with mask "
                         f"{from_mask.tolist()}")
    return lengths


def _times(times, n: int, t: int, lengths) -> torch.Tensor:
    """``(N, T)`` frame times; padded positions set to the last real time (KernelTemporal
    needs non-decreasing times; the graph masks every term touching padding)."""
    if times is None:
        raise FieldlibError("times (N, T) in seconds are needed for the temporal factor "
                            "(or pass use_temporal=False)")
    tt = times if isinstance(times, torch.Tensor) else torch.as_tensor(times)
    if tuple(tt.shape) not in ((n, t), (t,)) or tt.is_complex() or tt.dtype == torch.bool:
        raise ShapeError(f"times must be real, of shape (N, T) = ({n}, {t}) (or (T,)), got "
                         f"{tt.dtype} {tuple(tt.shape)}")
    tt = tt.expand(n, t)
    if lengths is not None:
        lengths = lengths.to(tt.device)
        real = torch.arange(t, device=tt.device) < lengths[:, None]
        last = tt.gather(1, (lengths - 1).clamp(min=0)[:, None])
        tt = torch.where(real, tt, torch.where(lengths[:, None] > 0, last, tt.new_zeros(())))
    if tt.is_floating_point() and not bool(torch.isfinite(tt).all()):
        raise ShapeError("times must be finite on real frames")
    drop = torch.diff(tt, dim=-1) < 0
    if bool(drop.any()):
        v, k = (int(i) for i in drop.nonzero()[0])
        raise ShapeError(f"times must be non-decreasing along each video: video {v} goes "
                         f"from {float(tt[v, k])} to {float(tt[v, k + 1])} at frame {k + 1}")
    return tt


def video_graph(heads, state_space: StateSpace | FrameLayout, *, mu=None,
                kernel=SIGMA_SECONDS, times=None, lengths=None, mask=None,
                component: str = "object", use_temporal: bool = True,
                use_intent: bool = True, n_intents: int | None = None) -> VideoCRF:
    """N whole videos of T frames as one factor graph (MATH.md §2; Eq. 3 for a KernelSum;
    synchronous training and testing with any engine: mean-field Eq. 5-6, losses Eq. 7-9).

        score(x, I) = Σ_t φX(x_t) + Σ_t φXI(x_t, I) + Σ_{i<j} µ(d(x_i), d(x_j)) k(t_i, t_j)

    Args:
        heads: head outputs with leading dims ``(N, T)`` (module docstring).
        state_space: the :class:`StateSpace` (or its :class:`FrameLayout`).
        mu: ``(D, D)`` µ on ``component`` (D = O, or O * P); needed when ``use_temporal``.
        kernel: σ in seconds (default 6.25 s, the paper's), a ``GaussianKernel`` or
            ``KernelSum`` (fieldlib.kernels), on ``times``.
        times: ``(N, T)`` (or ``(T,)``) frame times in seconds, non-decreasing on real
            frames; padded positions may hold anything finite or not (they are replaced).
        lengths: ``(N,)`` real frames per video, or ``mask (N, T)`` bool (a prefix per
            video, as ``collate_videos`` gives); padding is masked out by the graph.
        component: what φXI and µ act on: ``"object"`` (paper) or ``"object_progress"``
            (released code, column ``q = o * P + p``).
        use_temporal: False drops φXX (no KernelTemporal; mu and times ignored).
        use_intent: False drops φXI and the intent variable (phi_xi ignored).
        n_intents: N_I, checked against ``phi_xi`` (default: its last axis).

    Returns a :class:`VideoCRF`. Factors are named ``phi_op``, ``phi_ap``, ``phi_os``,
    ``phi_b``, ``phi_xi``, ``mu`` (their parameters ``"phi_op.table"``, ..., ``"mu.mu"``);
    head tensors are used as given (no copy), so gradients reach them.

    Raises:
        ShapeError: a head, mu, times, lengths or mask of the wrong shape (naming it), a
            mask that is not a prefix, decreasing times.
        FieldlibError: an unknown component, a missing head or mu for an enabled factor, a
            state space without a class mapping; the factors' own errors (NaN or +inf
            potentials, see fieldlib.factors).
    """
    layout = frame_layout(state_space)
    column = component_column(component)
    h = _heads(heads, layout, ("N", "T"), component, use_intent, n_intents)
    n, t = h["phi_op"].shape[:2]
    lengths = _lengths(lengths, mask, n, t)
    g = FactorGraph()
    x = g.array("x", t, layout.domain, lengths=lengths)
    g.add(_frame_factors(x, h, layout))
    intent = None
    if use_intent:
        intent = g.variable("I", h["phi_xi"].shape[-1])
        g.add(FrameIntent(x, intent, h["phi_xi"], component=column, name="phi_xi"))
    if use_temporal:
        mu = _check_mu(mu, layout, component)
        g.add(KernelTemporal(x, mu, _times(times, n, t, lengths), kernel, component=column,
                             name="mu"))
    return VideoCRF(g, x, intent, layout, component)


# -- sampled frames (the asynchronous step) ---------------------------------------------------
def frame_inputs(heads, state_space: StateSpace | FrameLayout, *, component: str = "object",
                 mu=None, use_intent: bool = True, n_intents: int | None = None) -> dict:
    """The asynchronous step's inputs for B sampled frames (MATH.md §5, Eq. 10, Algorithm 2).

        asynchronous_step(store, seq, frame, time, label=frame_state(...), **inputs)

    Args:
        heads: head outputs with leading dim ``(B,)`` (module docstring).
        component, use_intent, n_intents: as :func:`video_graph`.
        mu: optional ``(D, D)``: checked and passed on as ``"mu"`` (or give it to the step
            yourself; leave it out for the no-temporal ablation).

    Returns ``{"unary": (B, |B| * S) φX on the frame states (the Component factors' block
    tables summed, the same as :func:`~fieldlib.inference.asynchronous.frame_potentials` of
    :func:`video_graph`), "mu_component": (|B| * S,), "phi_xi": (B, D, N_I) or None,
    "xi_component": (|B| * S,) or None [, "mu": (D, D)]}``; differentiable in the heads.

    Raises: as :func:`video_graph`.
    """
    layout = frame_layout(state_space)
    component_column(component)
    h = _heads(heads, layout, ("B",), component, use_intent, n_intents)
    frame = Variable("x", layout.domain)
    # Σ of the tables, each gathered once per row of B where it does not depend on the scene
    unary = block_table_sum(_frame_factors(frame, h, layout))
    state_map = layout.component(component)[0].to(unary.device)
    out = {"unary": unary, "mu_component": state_map, "phi_xi": h["phi_xi"],
           "xi_component": state_map if use_intent else None}
    if mu is not None:
        out["mu"] = _check_mu(mu, layout, component)
    return out
