"""One stream (RGB or flow) of the two-stream Charades network: the per-frame potentials of
the Asynchronous Temporal Field (MATH.md §2) from a backbone's features (fc7 for VGG-16).

For B frames (features f, (B, F)), every head linear without bias (MATH.md §9):

    phi_op (B, O, P)     φ(o, p)                 object x progress
    phi_ap (B, V, P)     φ(a, p)                 verb x progress
    phi_os (B, O, S)     scene_weight · φ(o, s)  object x scene (zeros when scene_weight = 0)
    phi_b  (B, |B'|)     φ(c, o, a, p)           one value per row of ``net.states``
    phi_xi (B, D, N_I)   φXI = ψ_t(d, I)         f -> hidden -> ReLU -> Dropout -> D·N_I

The frame factor is φX = φ(o,p) + φ(a,p) + φ(o,s) + φ(c,o,a,p) (MATH.md §2). D is the
component of φXI and µ: O (``component="object"``, the paper) or O·P with index o·P + p
(``"object_progress"``, the released code, §9). Learned parameters not predicted from the
input: ``mu`` (D, D), asymmetric, init zeros (φXX = µ(d_i, d_j) k(t_i, t_j), i < j), and
``kernel_weights`` (M,) of k = Σ_m w_m exp(-Δt² / 2σ_m²) (Eq. 3), σ_m in seconds;
:meth:`StreamNet.kernel` returns the :class:`fieldlib.kernels.KernelSum`, which carries the
weights' gradient. ``progress=False`` (Fig. 8 ablation) gives P = 1 and φ(c, o, a, p) over
the distinct (c, o, a) of B (``net.states``, progress column 0; ``net.state_index`` maps
each row of B to its row there).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.kernels import GaussianKernel, KernelSum

from .backbones import STREAM_CHANNELS, make_backbone
from .statespace import N_PROGRESS, StateSpace

__all__ = ["FrameHeads", "StreamNet", "HEAD_NAMES", "COMPONENTS"]

#: Keys of :meth:`StreamNet.head_parameters` (per-head gradient norms in training logs).
HEAD_NAMES = ("backbone", "phi_op", "phi_ap", "phi_os", "phi_b", "phi_xi", "mu", "kernel")
#: Components φXI and µ act on: the paper's object, or the released code's object x progress.
COMPONENTS = ("object", "object_progress")
#: Paper's kernel: σ = 150 frames at 24 fps, in seconds (MATH.md §2).
PAPER_SIGMAS = (6.25,)


@dataclass(frozen=True)
class FrameHeads:
    """The per-frame potentials of :class:`StreamNet` (see the module docstring).

    Each tensor has leading axes ``(B,)`` as returned by the network, or ``(N, T)`` after
    :meth:`view`: phi_op (.., O, P), phi_ap (.., V, P), phi_os (.., O, S), phi_b (.., |B'|),
    phi_xi (.., D, N_I).
    """

    phi_op: torch.Tensor
    phi_ap: torch.Tensor
    phi_os: torch.Tensor
    phi_b: torch.Tensor
    phi_xi: torch.Tensor

    @property
    def batch_shape(self) -> torch.Size:
        """``(B,)`` or ``(N, T)``."""
        return self.phi_b.shape[:-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in field order (no copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn) -> FrameHeads:
        return FrameHeads(**{k: fn(v) for k, v in self.tensors().items()})

    def view(self, n: int, t: int) -> FrameHeads:
        """Frames ``(N·T, ...)`` of N videos of T frames each (video-major) -> ``(N, T, ...)``.

        Raises ShapeError when the heads are not flat or B != n·t."""
        if len(self.batch_shape) != 1 or self.batch_shape[0] != n * t:
            raise ShapeError(f"FrameHeads.view({n}, {t}): needs flat heads of {n * t} frames, "
                             f"have batch shape {tuple(self.batch_shape)}")
        return self._map(lambda v: v.reshape(n, t, *v.shape[1:]))

    def flatten(self) -> FrameHeads:
        """``(N, T, ...)`` -> ``(N·T, ...)`` (the inverse of :meth:`view`)."""
        k = len(self.batch_shape)
        return self._map(lambda v: v.flatten(0, k - 1))


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise FieldlibError(f"StreamNet: {what} must be an integer >= 1, got {value!r}")
    return int(value)


def _head_states(space: StateSpace, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows phi_b is over (int64 [|B'|, 4]), index of each row of B there (int64 [|B|]))."""
    if progress:
        return space.states.copy(), np.arange(space.size, dtype=np.int64)
    collapsed = space.states.copy()
    collapsed[:, 3] = 0
    rows, index = np.unique(collapsed, axis=0, return_inverse=True)
    return rows.astype(np.int64), index.reshape(-1).astype(np.int64)


def _linear(n_in: int, n_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(layer.weight, 0.0, std)
    return layer


class StreamNet(nn.Module):
    """One stream of the two-stream network: frames -> :class:`FrameHeads` (MATH.md §2, §9).

    Args:
        state_space: the :class:`StateSpace` (with a class -> object/verb mapping); gives
            O, V (its labels), S (``n_scenes``) and B (``states``).
        stream: ``"rgb"`` (3 channels) or ``"flow"`` (20 channels).
        backbone: ``"small"`` or ``"vgg16"`` (see :mod:`.backbones`), or a module with
            ``in_channels`` and ``out_features`` attributes.
        weights: path of the backbone's weights (vgg16: a torchvision vgg16 state_dict).
        n_intents: N_I (paper: 30). component: ``"object"`` (paper) or
            ``"object_progress"`` (released code): D of φXI and µ.
        scene_weight: factor on φ(o, s); 0.0 reproduces the released code (no scene
            potential): phi_os is then zeros (no layer is built).
        progress: False: P = 1 (the "no progress" ablation, see the module docstring).
        detach_intent: True blocks the gradient from φXI into the backbone (released code).
        sigmas: σ_m of the M Gaussian kernels, in seconds (paper: 6.25 s = 150 frames at
            24 fps); one number is one kernel. learn_kernel_weights: whether
            ``kernel_weights`` (init 1) learn.
        dropout: the φXI hidden layer's dropout. intent_hidden: its width (100).
        head_init_std: std of the normal init of the bias-free head weights (0.01).
        backbone_options: extra keyword options of the backbone (``dropout``, ``features``).

    Raises:
        FieldlibError: a state space without a class mapping (use
            ``labels.with_derived_mapping()``), an empty B, an unknown stream, component or
            backbone, bad option values, a bad weights file.
        ShapeError: (from forward) input not ``(B, C, H, W)`` with the stream's C.
    """

    def __init__(self, state_space: StateSpace, stream: str = "rgb", backbone="small",
                 weights=None, *, n_intents: int = 30, component: str = "object",
                 scene_weight: float = 1.0, progress: bool = True, detach_intent: bool = False,
                 sigmas=PAPER_SIGMAS, learn_kernel_weights: bool = True, dropout: float = 0.5,
                 intent_hidden: int = 100, head_init_std: float = 0.01,
                 backbone_options: dict | None = None) -> None:
        super().__init__()
        labels = state_space.labels
        if not labels.has_mapping or (state_space.states[:, 1:3] < 0).any():
            raise FieldlibError(
                "StreamNet: the state space has no class -> object/verb mapping (frames are "
                "category-only); build it from labels.with_derived_mapping() or load the "
                "mapping files (load_labels(mapping=..., objects=..., verbs=...))")
        if state_space.size == 0:
            raise FieldlibError("StreamNet: the state space B is empty (no training frames)")
        if stream not in STREAM_CHANNELS:
            raise FieldlibError(f"StreamNet: unknown stream {stream!r}; use "
                                f"{' or '.join(STREAM_CHANNELS)}")
        if component not in COMPONENTS:
            raise FieldlibError(f"StreamNet: unknown component {component!r}; use "
                                f"{' or '.join(COMPONENTS)}")
        if isinstance(scene_weight, bool) or not isinstance(scene_weight, numbers.Real) \
                or not math.isfinite(scene_weight):
            raise FieldlibError(f"StreamNet: scene_weight must be a finite number, "
                                f"got {scene_weight!r}")
        if not (isinstance(dropout, numbers.Real) and 0.0 <= dropout <= 1.0):
            raise FieldlibError(f"StreamNet: dropout must be in [0, 1], got {dropout!r}")
        self.stream, self.component = stream, component
        self.n_intents = _positive_int(n_intents, "n_intents")
        hidden = _positive_int(intent_hidden, "intent_hidden")
        self.scene_weight = float(scene_weight)
        self.progress, self.detach_intent = bool(progress), bool(detach_intent)
        self.n_objects, self.n_verbs = len(labels.objects), len(labels.verbs)
        self.n_progress = N_PROGRESS if self.progress else 1
        self.n_scenes = state_space.n_scenes
        self.component_size = self.n_objects * (self.n_progress
                                                if component == "object_progress" else 1)
        if isinstance(sigmas, numbers.Real):
            sigmas = (sigmas,)
        self._kernels = [GaussianKernel(s) for s in tuple(sigmas)]  # checks each σ
        if not self._kernels:
            raise FieldlibError("StreamNet: sigmas must hold at least one σ (seconds)")
        self.sigmas = tuple(k.sigma for k in self._kernels)
        states, index = _head_states(state_space, self.progress)
        self.register_buffer("states", torch.from_numpy(states), persistent=False)
        self.register_buffer("state_index", torch.from_numpy(index), persistent=False)
        self.n_states = int(states.shape[0])

        channels = STREAM_CHANNELS[stream]
        if isinstance(backbone, nn.Module):
            if weights is not None or backbone_options:
                raise FieldlibError("StreamNet: weights and backbone_options apply to a "
                                    "backbone given by name, not to a module")
            if getattr(backbone, "in_channels", None) != channels or \
                    not isinstance(getattr(backbone, "out_features", None), int):
                raise FieldlibError(f"StreamNet: a backbone module needs in_channels = "
                                    f"{channels} ({stream}) and an int out_features")
            self.backbone = backbone
        else:
            self.backbone = make_backbone(backbone, channels, weights=weights,
                                          **(backbone_options or {}))
        f = self.backbone.out_features
        o, v, p, s, d = (self.n_objects, self.n_verbs, self.n_progress, self.n_scenes,
                         self.component_size)
        self.phi_op = _linear(f, o * p, head_init_std)
        self.phi_ap = _linear(f, v * p, head_init_std)
        self.phi_os = _linear(f, o * s, head_init_std) if self.scene_weight != 0.0 else None
        self.phi_b = _linear(f, self.n_states, head_init_std)
        self.phi_xi = nn.Sequential(nn.Linear(f, hidden), nn.ReLU(inplace=True),
                                    nn.Dropout(dropout),
                                    _linear(hidden, d * self.n_intents, head_init_std))
        self.mu = nn.Parameter(torch.zeros(d, d))
        self.kernel_weights = nn.Parameter(torch.ones(len(self._kernels)),
                                           requires_grad=bool(learn_kernel_weights))

    @property
    def in_channels(self) -> int:
        return self.backbone.in_channels

    def kernel(self) -> KernelSum:
        """k(Δt) = Σ_m w_m exp(-Δt² / (2 σ_m²)) from the current ``kernel_weights`` (Eq. 3),
        Δt in seconds; the weights' gradient flows through it (when they learn)."""
        return KernelSum(self._kernels, self.kernel_weights)

    def forward(self, x: torch.Tensor) -> FrameHeads:
        """Frames ``x (B, C, H, W)`` -> :class:`FrameHeads` with leading axis B; for videos
        pass ``x.flatten(0, 1)`` and call ``heads.view(N, T)``. Vectorised over frames."""
        feats = self.backbone(x)
        n = feats.shape[0]
        o, v, p, s, d = (self.n_objects, self.n_verbs, self.n_progress, self.n_scenes,
                         self.component_size)
        if self.phi_os is None:
            phi_os = feats.new_zeros(n, o, s)
        else:
            phi_os = self.phi_os(feats).view(n, o, s)
            if self.scene_weight != 1.0:
                phi_os = phi_os * self.scene_weight
        xi_in = feats.detach() if self.detach_intent else feats
        return FrameHeads(phi_op=self.phi_op(feats).view(n, o, p),
                          phi_ap=self.phi_ap(feats).view(n, v, p),
                          phi_os=phi_os,
                          phi_b=self.phi_b(feats),
                          phi_xi=self.phi_xi(xi_in).view(n, d, self.n_intents))

    def head_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{name: parameters}`` for the names of :data:`HEAD_NAMES`, each parameter of the
        module in exactly one list (``phi_os`` is empty when scene_weight = 0)."""
        def params(m):
            return [] if m is None else list(m.parameters())

        return {"backbone": params(self.backbone), "phi_op": params(self.phi_op),
                "phi_ap": params(self.phi_ap), "phi_os": params(self.phi_os),
                "phi_b": params(self.phi_b), "phi_xi": params(self.phi_xi),
                "mu": [self.mu], "kernel": [self.kernel_weights]}

    def extra_repr(self) -> str:
        return (f"stream={self.stream!r}, O={self.n_objects}, V={self.n_verbs}, "
                f"P={self.n_progress}, S={self.n_scenes}, B={self.n_states}, "
                f"component={self.component!r} (D={self.component_size}), "
                f"n_intents={self.n_intents}, scene_weight={self.scene_weight:g}, "
                f"detach_intent={self.detach_intent}, sigmas={self.sigmas}")
