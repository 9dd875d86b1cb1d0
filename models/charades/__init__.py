"""Charades: annotation files, labels, the frame state space, the official metrics and
submission formats, synthetic videos and torch datasets (docs/charades.md).

Modules, one role each: ``labels`` (classes, mapping files, vocabularies), ``annotations``
(CSV reader), ``statespace`` (progress, frame labels, sampling, the set B), ``submission``
(official submission files), ``metrics`` (Charades_v1_classify.m / _localize.m),
``baseline`` (prior submission), ``synthetic`` (generated frames), ``datasets`` (torch
Datasets), ``cli`` (``fieldlib charades``).
"""

from .annotations import Annotations, Instance, Video, parse_actions, read_annotations
from .baseline import prior_classify_scores, prior_localize_scores
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
]
