"""A prior-only baseline submission: scores from training-set frequencies, no frames seen.

Classification: each class scores the fraction of training videos that contain it.
Localization: class c at time point k scores the fraction of training videos where c is
active at the k-th official time point ``((k-1)/25) * length`` (MATH.md §8).
A sanity floor for the metrics and an end-to-end demo of the submission commands.
"""

from __future__ import annotations

import numpy as np

from .annotations import Annotations
from .labels import N_CLASSES
from .statespace import N_TEST_FRAMES, time_point_labels


def prior_classify_scores(train: Annotations, n_videos: int,
                          n_classes: int = N_CLASSES) -> np.ndarray:
    """float64 [n_videos, n_classes]: the same class frequencies for every video."""
    freq = train.video_labels(n_classes).mean(axis=0)
    return np.broadcast_to(freq, (n_videos, n_classes)).copy()


def prior_localize_scores(train: Annotations, n_videos: int, n_classes: int = N_CLASSES,
                          n_frames: int = N_TEST_FRAMES) -> np.ndarray:
    """float64 [n_videos, n_frames, n_classes]: per time point class frequencies."""
    labels = time_point_labels(train, n_frames, n_classes)
    freq = labels.reshape(len(train), n_frames, n_classes).mean(axis=0)
    return np.broadcast_to(freq, (n_videos, n_frames, n_classes)).copy()
