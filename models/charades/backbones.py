"""Frame backbones of the two-stream network, chosen by name (MATH.md §9: heads from fc7).

A backbone maps frames ``x (B, C, H, W)`` to features ``(B, F)``; ``out_features`` is F,
``in_channels`` is C (3 for RGB, 20 for a stack of 10 flow fields (x, y)). Two exist:

- ``"vgg16"``: torchvision's VGG-16 (``torchvision.models.vgg16(weights=None)``; nothing is
  ever downloaded) up to fc7: ``features``, ``avgpool``, then ``classifier[:-1]`` (fc6, ReLU,
  Dropout, fc7, ReLU, Dropout), F = 4096, inputs 224 x 224 (any side >= 32 works through the
  adaptive pool). For flow, conv1 is widened to 20 input channels and initialised from the
  RGB conv1 averaged over its 3 input channels and repeated 20 times (cross-modality
  initialisation of two-stream networks). ``weights=PATH`` loads a local file in
  torchvision's ``vgg16().state_dict()`` format (``classifier.6.*``, the ImageNet layer, is
  ignored); an RGB conv1 in the file is widened after loading, a 20-channel one loads as is.
- ``"small"``: three conv + normalisation + ReLU blocks and a linear layer to F = 256
  (default) on 32-64 pixel frames, for CPU tests and demos; ``weights=PATH`` loads its own
  state_dict. ``norm="batch"`` (default: BatchNorm; across processes the training converts it
  to a batch norm whose statistics span every process's frames, SyncBatchNorm running on GPUs
  only) or ``"group"`` (GroupNorm: per frame, so a frame's features do not depend on the
  other frames of its batch; on the synthetic frames it learns far slower).

Errors: FieldlibError for an unknown backbone name or option, and for a weights file that
is missing, not a torch state_dict (FormatError) or of another architecture (the message
names the file, the missing and unexpected keys and the tensors of the wrong shape);
ShapeError for input of the wrong rank, channel count or too small a side.
"""

from __future__ import annotations

import inspect
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from fieldlib.errors import FieldlibError, FormatError, ShapeError

from .synthetic import FLOW_CHANNELS

__all__ = ["BACKBONES", "STREAM_CHANNELS", "SmallBackbone", "VGG16Backbone",
           "make_backbone", "read_state_dict", "check_state_dict", "widen_first_conv"]

#: Input channels of each stream: RGB frames, stacks of 10 flow fields (x, y).
STREAM_CHANNELS = types.MappingProxyType({"rgb": 3, "flow": FLOW_CHANNELS})


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a local ``torch.save``-d state_dict (memory-mapped when possible).

    A dict ``{"state_dict": {...}}`` (a common checkpoint wrapper) is unwrapped. Only
    tensors are read (``weights_only=True``: no code in the file runs).

    Raises:
        FieldlibError: ``path`` is not a file.
        FormatError: the file is not a torch state_dict (garbage bytes, a pickle of
            something else, entries that are not tensors).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise FieldlibError(f"weights file {path}: {what}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise FormatError(f"weights file {path}: not a torch state_dict "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FormatError(f"weights file {path}: holds a {type(state).__name__}, "
                          "not a state_dict (a dict of tensors)")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise FormatError(f"weights file {path}: {len(bad)} entries are not named tensors "
                          f"(e.g. {bad[:3]}); expected a state_dict")
    return state


def check_state_dict(state: dict, expected: dict, path, what: str) -> None:
    """FieldlibError naming ``path`` unless ``state`` has exactly the keys of ``expected``
    (name -> shape) with those shapes: lists missing keys, unexpected keys, wrong shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: expected {tuple(expected[k])}, got {tuple(state[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrong shapes", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:5])}{more}")
        raise FieldlibError(f"weights file {path}: not a {what} state_dict: "
                            + "; ".join(parts))


def widen_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` with ``in_channels`` inputs: its weight averaged over the input
    channels and repeated ``in_channels`` times, bias copied (two-stream flow init)."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.expand(-1, in_channels, -1, -1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class _Backbone(nn.Module):
    """Shared input check; subclasses set ``in_channels``, ``out_features``, ``min_size``."""

    in_channels: int
    out_features: int
    min_size: int = 1

    def check_input(self, x: torch.Tensor) -> None:
        """ShapeError unless ``x`` is ``(B, in_channels, H, W)`` with H, W >= min_size."""
        if not torch.is_tensor(x) or x.dim() != 4:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ShapeError(f"{type(self).__name__}: expected frames (B, {self.in_channels},"
                             f" H, W), got {got} (flatten (N, T, ...) videos with "
                             "x.flatten(0, 1))")
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"{type(self).__name__}: expected {self.in_channels} channels, "
                             f"got {x.shape[1]} (input {tuple(x.shape)})")
        if min(x.shape[2:]) < self.min_size:
            raise ShapeError(f"{type(self).__name__}: frames need sides >= {self.min_size} "
                             f"pixels, got {tuple(x.shape[2:])}")

    def load_weights(self, path) -> None:
        """Load this backbone's own state_dict from ``path`` (checked, see module doc)."""
        state = read_state_dict(path)
        expected = {k: v.shape for k, v in self.state_dict().items()}
        check_state_dict(state, expected, path, type(self).__name__)
        self.load_state_dict(state)


class SmallBackbone(_Backbone):
    """Three blocks conv3x3 -> norm -> ReLU (-> 2x2 max-pool after the first two), global
    average pool, Linear -> ReLU: ``(B, C, H, W) -> (B, features)``.

    Args:
        in_channels: C. features: F (default 256). widths: the three conv widths.
        norm: ``"batch"`` (BatchNorm2d, the default: statistics of the batch in training) or
            ``"group"`` (GroupNorm with groups of 4 channels: per frame).
        weights: optional path of a state_dict of this module.
    """

    min_size = 8  # two 2x2 pools leave 2x2: BatchNorm trains even on one frame

    def __init__(self, in_channels: int = 3, *, features: int = 256,
                 widths: tuple[int, int, int] = (16, 32, 64), norm: str = "batch",
                 weights=None) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1 or int(features) < 1:
            raise FieldlibError(f"small backbone: widths must be 3 positive ints and features"
                                f" > 0, got widths={widths}, features={features}")
        if norm not in ("group", "batch"):
            raise FieldlibError(f"small backbone: norm must be 'group' or 'batch', got "
                                f"{norm!r}")
        self.in_channels, self.out_features = int(in_channels), int(features)
        layers, c = [], self.in_channels
        for k, w in enumerate(widths):
            layer = (nn.BatchNorm2d(w) if norm == "batch"
                     else nn.GroupNorm(max(1, w // 4), w))
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), layer,
                       nn.ReLU(inplace=True)]
            if k < 2:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c, self.out_features), nn.ReLU(inplace=True))
        if weights is not None:
            self.load_weights(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> features ``(B, F)``."""
        self.check_input(x)
        return self.fc(self.features(x))


def _vgg16_parts(conv1_channels: int, dropout: float) -> dict[str, nn.Module]:
    import torchvision

    vgg = torchvision.models.vgg16(weights=None, dropout=dropout)
    if conv1_channels != 3:
        with torch.device(vgg.features[0].weight.device):
            vgg.features[0] = nn.Conv2d(conv1_channels, 64, 3, padding=1)
    return {"features": vgg.features, "avgpool": vgg.avgpool,
            "classifier": nn.Sequential(*list(vgg.classifier)[:-1])}


class VGG16Backbone(_Backbone):
    """VGG-16 up to fc7 (after its ReLU and Dropout): ``(B, C, 224, 224) -> (B, 4096)``.

    Submodules ``features``, ``avgpool``, ``classifier`` keep torchvision's names, so the
    state_dict keys are torchvision's (``classifier.0`` = fc6, ``classifier.3`` = fc7).

    Args:
        in_channels: 3 (RGB) or any other count (flow: 20), conv1 widened from RGB.
        weights: path of a torchvision vgg16 state_dict; None: random initialisation (a
            warning says so). With a file, the network is built on the meta device and
            filled from it (no random init is spent).
        dropout: the two classifier dropouts (VGG: 0.5).

    Raises:
        FieldlibError / FormatError: a bad weights file (see the module docstring).
    """

    out_features = 4096
    min_size = 32

    def __init__(self, in_channels: int = 3, *, weights=None, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        if weights is None:
            warnings.warn("vgg16 backbone: no weights file given, random initialisation "
                          "(pass weights=PATH of a torchvision vgg16 state_dict)", stacklevel=3)
            parts, file_channels = _vgg16_parts(3, dropout), 3
        else:
            state = read_state_dict(weights)
            state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
            conv1 = state.get("features.0.weight")
            file_channels = 3
            if conv1 is not None and conv1.dim() == 4 and conv1.shape[1] == self.in_channels:
                file_channels = self.in_channels
            with torch.device("meta"):
                parts = _vgg16_parts(file_channels, dropout)
            expected = {f"{name}.{k}": v.shape for name, part in parts.items()
                        for k, v in part.state_dict().items()}
            check_state_dict(state, expected, weights, "torchvision vgg16")
        for name, part in parts.items():
            self.add_module(name, part)
        if weights is not None:
            self.to_empty(device="cpu")
            self.load_state_dict(state)
        if file_channels != self.in_channels:
            self.features[0] = widen_first_conv(self.features[0], self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> fc7 features ``(B, 4096)``."""
        self.check_input(x)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


#: Backbone classes by name (read-only).
BACKBONES = types.MappingProxyType({"small": SmallBackbone, "vgg16": VGG16Backbone})


def make_backbone(name: str, in_channels: int, **options) -> nn.Module:
    """The backbone ``name`` (``"small"`` or ``"vgg16"``) for ``in_channels`` input channels;
    ``options`` go to its class (``weights=PATH``, ``dropout``, ``features``, ``widths``).

    Raises FieldlibError for an unknown name or option."""
    if name not in BACKBONES:
        raise FieldlibError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    cls = BACKBONES[name]
    try:
        inspect.signature(cls).bind(in_channels, **options)
    except TypeError as exc:
        raise FieldlibError(f"backbone {name!r}: bad options {sorted(options)} ({exc})") \
            from None
    return cls(in_channels, **options)
