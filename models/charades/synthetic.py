"""Synthetic Charades frames generated from real annotation rows (no real frames exist here).

A frame of video ``v`` at JPEG frame number ``f`` (24 fps, 1-based, as the official
Charades_v1_rgb layout; time ``(f-1)/24`` s) is

    x = sum over active classes c:   a_C p_C[c] + a_O p_O[object(c)] + a_V p_V[verb(c)]
                                     + a_P p_P[progress(c, t)]
        + a_S p_S[scene(v)] + noise_sigma * eps(v, f)

where the p's are fixed random patterns (drawn once from ``seed``; low-frequency: Gaussian
at ``pattern_res`` x ``pattern_res`` upsampled bilinearly, rescaled to unit RMS), "active"
means ``start <= t <= end`` (statespace conventions), objects/verbs/progress present in the
frame count once each, and ``eps`` is white Gaussian noise drawn from a generator seeded by
(seed, stream, crc32(video id), f), so a frame is the same whether rendered alone or inside
a whole video. RGB frames have 3 channels, flow stacks 20 (10 frames x (x, y), as the
official Charades_v1_flow stacks) with their own patterns.

Amplitudes: ``a = weight * snr * noise_sigma / sqrt(D)`` with D the values a frame holds
(3 H W or 20 H W), so ``snr`` is the matched-filter signal-to-noise ratio of one
unit-weight pattern in one frame, whatever the size. With the default snr = 2 one frame is
ambiguous among 157 classes (a matched filter that knows the class patterns picks the right
class for about a quarter of single frames, 32 x 32, one active class), while averaging 8
frames of the same instance (SNR 2 sqrt 8) identifies it about 95 % of the time: temporal
context measurably helps (tests/charades/test_charades_synthetic.py). The scene adds a
video-wide pattern, and classes co-occur as in the real annotations (the "intent").
RGB weights (class, object, verb, progress, scene) = (1, 1, 0.5, 0.5, 1); flow weights =
(1, 0.3, 1, 1, 0.2): appearance in RGB, motion in flow.

Without a class -> object/verb mapping the generator uses
:func:`fieldlib.models.charades.labels.derived_mapping` (seed 157), so object/verb
structure exists in synthetic data; pass the same ``labels.with_derived_mapping()`` to the
datasets to get matching object/verb targets.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fieldlib.errors import FieldlibError

from .annotations import Video
from .labels import LabelSpace, Vocabulary
from .statespace import JPEG_FPS, N_PROGRESS, progress_labels

RGB_WEIGHTS = (1.0, 1.0, 0.5, 0.5, 1.0)
FLOW_WEIGHTS = (1.0, 0.3, 1.0, 1.0, 0.2)
FLOW_CHANNELS = 20


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings: frame ``size`` (pixels), ``snr`` (one-frame matched-filter SNR of a
    unit-weight pattern), ``noise_sigma``, ``pattern_res`` (pattern grid before upsampling),
    ``seed``, ``fps`` (frame numbering rate)."""

    size: int = 32
    snr: float = 2.0
    noise_sigma: float = 1.0
    pattern_res: int = 8
    seed: int = 0
    fps: float = JPEG_FPS


def _patterns(rng: np.random.Generator, n: int, channels: int, cfg: SyntheticConfig):
    low = rng.standard_normal((n, channels, cfg.pattern_res, cfg.pattern_res))
    up = F.interpolate(torch.from_numpy(low), size=(cfg.size, cfg.size), mode="bilinear",
                       align_corners=False)
    up = up - up.mean(dim=(1, 2, 3), keepdim=True)
    up = up / up.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return up.reshape(n, -1).float()  # [n, channels * H * W], unit RMS


class SyntheticCharades:
    """Renders RGB frames [T, 3, H, W] and flow stacks [T, 20, H, W] (float32) for real
    annotation rows. ``labels``: the class vocabulary (and mapping, else a derived one);
    ``scenes``: the scene vocabulary (unknown scenes get no scene pattern).
    """

    def __init__(self, labels: LabelSpace, scenes: Vocabulary,
                 config: SyntheticConfig | None = None) -> None:
        self.config = cfg = config or SyntheticConfig()
        if cfg.size < 4 or cfg.pattern_res < 1 or not 0 <= cfg.snr < math.inf \
                or not 0 <= cfg.noise_sigma < math.inf:
            raise FieldlibError(f"bad synthetic config {cfg}")
        self.labels = labels.with_derived_mapping()
        self.scenes = scenes
        n_c, n_o, n_v = self.labels.n_classes, len(self.labels.objects), len(self.labels.verbs)
        rng = np.random.default_rng(cfg.seed)
        self._streams = {}
        for name, channels, weights in (("rgb", 3, RGB_WEIGHTS), ("flow", FLOW_CHANNELS,
                                                                   FLOW_WEIGHTS)):
            scale = cfg.snr * cfg.noise_sigma / np.sqrt(channels * cfg.size * cfg.size)
            pats = [_patterns(rng, k, channels, cfg) * (w * scale)
                    for k, w in zip((n_c, n_o, n_v, N_PROGRESS, max(len(scenes), 1)), weights)]
            self._streams[name] = (channels, pats)

    def patterns(self, stream: str = "rgb") -> dict[str, torch.Tensor]:
        """The scaled patterns of a stream, [n, channels * H * W] each: keys ``category``,
        ``object``, ``verb``, ``progress``, ``scene`` (for oracle tests and diagnostics)."""
        _, pats = self._streams[stream]
        return dict(zip(("category", "object", "verb", "progress", "scene"), pats))

    def n_frames(self, video: Video) -> int:
        """Frames the synthetic video has at ``fps``: ``max(1, ceil(length * fps))``."""
        return max(1, int(np.ceil(video.length * self.config.fps)))

    def _noise(self, stream: str, videos: list, frames: np.ndarray, dim: int) -> torch.Tensor:
        """``(B, dim)`` white noise of each (video, frame) row, from a generator seeded by
        (seed, stream, crc32(video id), frame): a frame's noise whatever batch it is in."""
        sid = 0 if stream == "rgb" else 1
        out = np.empty((len(frames), dim), dtype=np.float32)
        for i, (v, f) in enumerate(zip(videos, frames)):  # one generator a frame, by design
            key = zlib.crc32(v.id.encode("utf-8"))
            rng = np.random.default_rng([self.config.seed, sid, key, int(f)])
            out[i] = rng.standard_normal(dim, dtype=np.float32)
        return torch.from_numpy(out) * self.config.noise_sigma

    def render(self, stream: str, video: Video, frames) -> torch.Tensor:
        """Frames ``frames`` (1-based numbers, int [T]) of ``stream`` ("rgb" or "flow") as
        float32 [T, channels, H, W] (:meth:`render_many` of one video)."""
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        return self.render_many(stream, [video] * frames.size, frames)

    def render_many(self, stream: str, videos, frames) -> torch.Tensor:
        """One frame of each of B (video, frame number) pairs (videos may repeat), as
        float32 [B, channels, H, W], in one program over the batch (the module docstring's
        sum; a frame is the same whatever batch it is rendered in)."""
        if stream not in self._streams:
            raise FieldlibError(f"unknown stream {stream!r} (rgb or flow)")
        videos = list(videos)
        frames = np.asarray(frames, dtype=np.int64).reshape(-1)
        if len(videos) != frames.size:
            raise FieldlibError(f"render_many: {len(videos)} videos for {frames.size} frames")
        channels, (p_c, p_o, p_v, p_p, p_s) = self._streams[stream]
        b, times = frames.size, (frames - 1) / self.config.fps
        x = torch.zeros(b, p_c.shape[1])
        # every (row, action of the row's video) pair, actions in CSV order
        n_act = np.array([len(v.actions) for v in videos], dtype=np.int64)
        row = np.repeat(np.arange(b), n_act)
        acts = [a for v in videos for a in v.actions]
        start = np.array([a.start for a in acts], dtype=np.float64)
        end = np.array([a.end for a in acts], dtype=np.float64)
        cls = np.array([a.cls for a in acts], dtype=np.int64)
        t = times[row]
        inside = (start <= t) & (t <= end)
        if inside.any():
            row, cls, t = row[inside], cls[inside], t[inside]
            prog = progress_labels(t, start[inside], end[inside])
            # a class twice in a frame: its first-listed instance's progress (frame_labels)
            key, first = np.unique(row * self.labels.n_classes + cls, return_index=True)
            f_idx, c_idx, prog = key // self.labels.n_classes, cls[first], prog[first]
            x.index_add_(0, torch.from_numpy(f_idx), p_c[torch.from_numpy(c_idx)])
            for table, pats in ((self.labels.class_object, p_o), (self.labels.class_verb, p_v)):
                k = np.unique(f_idx * len(pats) + table[c_idx])  # each present once
                x.index_add_(0, torch.from_numpy(k // len(pats)), pats[k % len(pats)])
            k = np.unique(f_idx * N_PROGRESS + prog)
            x.index_add_(0, torch.from_numpy(k // N_PROGRESS), p_p[k % N_PROGRESS])
        scene = np.array([self.scenes.get(v.scene, -1) for v in videos], dtype=np.int64)
        known = np.flatnonzero(scene >= 0)
        if known.size:
            at = torch.from_numpy(known)
            x[at] = x[at] + p_s[torch.from_numpy(scene[known])]
        x = x + self._noise(stream, videos, frames, x.shape[1])
        size = self.config.size
        return x.reshape(b, channels, size, size)

    def rgb(self, video: Video, frames) -> torch.Tensor:
        """RGB frames, float32 [T, 3, H, W]."""
        return self.render("rgb", video, frames)

    def flow(self, video: Video, frames) -> torch.Tensor:
        """Flow stacks, float32 [T, 20, H, W], channels (x1, y1, ..., x10, y10)."""
        return self.render("flow", video, frames)


def to_pixels(x: torch.Tensor, mean: float = 0.5, std: float = 0.125) -> np.ndarray:
    """Synthetic values -> uint8 pixels, the inverse of the folder reader's
    ``(v / 255 - mean) / std`` (up to rounding and clipping)."""
    v = (x.numpy() * std + mean) * 255.0
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def write_jpeg_folders(
    generator: SyntheticCharades, videos, rgb_root, flow_root=None, *,
    max_frames: int | None = None, quality: int = 95,
) -> int:
    """Write synthetic videos in the official layouts (``<rgb_root>/<ID>/<ID>-000001.jpg``,
    ``<flow_root>/<ID>/<ID>-000001x.jpg`` and ``y.jpg``; the flow image of frame f holds the
    first (x, y) pair of that frame's stack). ``max_frames`` caps the frames a video (the
    first ones). Returns the number of JPEG files written."""
    from pathlib import Path

    from PIL import Image
    from tqdm import tqdm

    written = 0
    # progress on stderr when it is a terminal (disable=None), silent otherwise
    for video in tqdm(list(videos), desc="synthetic videos", unit="video", disable=None):
        n = generator.n_frames(video)
        if max_frames is not None:
            n = min(n, max_frames)
        frames = np.arange(1, n + 1)
        folder = Path(rgb_root) / video.id
        folder.mkdir(parents=True, exist_ok=True)
        for f, img in zip(frames, to_pixels(generator.rgb(video, frames))):
            Image.fromarray(img.transpose(1, 2, 0)).save(
                folder / f"{video.id}-{f:06d}.jpg", quality=quality, subsampling=0)
            written += 1
        if flow_root is not None:
            folder = Path(flow_root) / video.id
            folder.mkdir(parents=True, exist_ok=True)
            for f, img in zip(frames, to_pixels(generator.flow(video, frames)[:, :2])):
                for axis, plane in zip("xy", img):
                    Image.fromarray(plane).save(folder / f"{video.id}-{f:06d}{axis}.jpg",
                                                quality=quality)
                    written += 1
    return written
