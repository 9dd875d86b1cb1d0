"""Charades: annotation files, labels, the frame state space, the official metrics and
submission formats, synthetic videos and torch datasets (docs/charades.md).

Modules, one role each: ``labels`` (classes, mapping files, vocabularies), ``annotations``
(CSV reader), ``statespace`` (progress, frame labels, sampling, the set B), ``submission``
(official submission files), ``metrics`` (Charades_v1_classify.m / _localize.m),
``baseline`` (prior submission), ``synthetic`` (generated frames), ``datasets`` (torch
Datasets); the model: ``backbones`` and ``network`` (the two-stream network and its heads),
``crf`` (head outputs -> factors), ``config``, ``data``, ``sampler``, ``checkpoint``,
``batchnorm``, ``runs`` and ``train`` (training), ``predict`` (test time, submissions);
``cli*`` (``fieldlib charades``).
"""

from .annotations import Annotations, Instance, Video, parse_actions, read_annotations
from .backbones import make_backbone
from .baseline import prior_classify_scores, prior_localize_scores
from .config import TrainConfig
from .crf import (
    FrameLayout,
    VideoCRF,
    class_scores,
    collapse_progress,
    frame_inputs,
    frame_layout,
    frame_state,
    video_graph,
)
from .data import TrainingData, load_training_data
from .datasets import (
    CharadesFrames,
    CharadesVideos,
    FolderSource,
    SyntheticSource,
    collate_videos,
)
from .labels import (
    N_CLASSES,
    N_OBJECTS,
    N_VERBS,
    LabelSpace,
    Vocabulary,
    default_classes,
    derived_mapping,
    load_labels,
    read_classes,
    read_mapping,
    read_object_classes,
    read_verb_classes,
    scene_vocabulary,
)
from .metrics import (
    EvalResult,
    average_precision,
    average_precision_loop,
    classification_arrays,
    classify_map,
    localization_arrays,
    localize_map,
    submission_from_arrays,
)
from .network import FrameHeads, StreamNet
from .predict import Predictions, evaluate, fuse, predict_run, predict_videos, write_submissions
from .runs import build_network, load_run
from .statespace import (
    JPEG_FPS,
    N_TEST_FRAMES,
    PROGRESS_NAMES,
    TRAIN_FPS,
    StateSpace,
    build_state_space,
    frame_class_table,
    frame_labels,
    frame_numbers,
    frame_times,
    progress_labels,
    time_point_labels,
    time_points,
    training_samples,
)
from .submission import (
    Submission,
    read_classify_submission,
    read_localize_submission,
    read_submission,
    write_classify_submission,
    write_localize_submission,
)
from .synthetic import SyntheticCharades, SyntheticConfig, write_jpeg_folders

__all__ = [
    "N_CLASSES", "N_OBJECTS", "N_VERBS", "N_TEST_FRAMES", "JPEG_FPS", "TRAIN_FPS",
    "PROGRESS_NAMES",
    "Annotations", "Instance", "Video", "parse_actions", "read_annotations",
    "LabelSpace", "Vocabulary", "default_classes", "derived_mapping", "load_labels",
    "read_classes", "read_mapping", "read_object_classes", "read_verb_classes",
    "scene_vocabulary",
    "StateSpace", "build_state_space", "frame_class_table", "frame_labels", "frame_numbers",
    "frame_times", "progress_labels", "time_points", "time_point_labels", "training_samples",
    "Submission", "read_submission", "read_classify_submission", "read_localize_submission",
    "write_classify_submission", "write_localize_submission",
    "EvalResult", "average_precision", "average_precision_loop",
    "classification_arrays", "localization_arrays", "classify_map", "localize_map",
    "submission_from_arrays",
    "prior_classify_scores", "prior_localize_scores",
    "SyntheticCharades", "SyntheticConfig", "write_jpeg_folders",
    "CharadesFrames", "CharadesVideos", "FolderSource", "SyntheticSource", "collate_videos",
    "StreamNet", "FrameHeads", "make_backbone",
    "FrameLayout", "VideoCRF", "class_scores", "collapse_progress", "frame_inputs",
    "frame_layout", "frame_state", "video_graph",
    "TrainConfig", "TrainingData", "load_training_data", "Trainer", "TrainingError",
    "TrainResult", "build_network", "load_run",
    "Predictions", "predict_videos", "predict_run", "fuse", "write_submissions", "evaluate",
]

#: Names of the training loop, imported on first use (so that ``python -m
#: fieldlib.models.charades.train`` does not find its module already imported).
_LAZY = {"Trainer", "TrainingError", "TrainResult"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.train"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
