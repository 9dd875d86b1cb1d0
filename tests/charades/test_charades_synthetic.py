import numpy as np
import pytest
import torch

from fieldlib.errors import FieldlibError
from fieldlib.models.charades import (
    Instance,
    SyntheticCharades,
    SyntheticConfig,
    Video,
    frame_labels,
    load_labels,
    scene_vocabulary,
)

SCENES = scene_vocabulary(["Kitchen", "Garage", "Bedroom"])


def _gen(**kw):
    return SyntheticCharades(load_labels(), SCENES, SyntheticConfig(**kw))


def test_shapes_and_determinism():
    v = Video("AB12C", "Kitchen", 3.0, (Instance(5, 0.0, 2.0), Instance(9, 1.0, 3.0)))
    g1, g2 = _gen(size=16, seed=3), _gen(size=16, seed=3)
    frames = np.array([1, 10, 40, 72])
    rgb, flow = g1.rgb(v, frames), g1.flow(v, frames)
    assert rgb.shape == (4, 3, 16, 16) and flow.shape == (4, 20, 16, 16)
    assert rgb.dtype == torch.float32
    torch.testing.assert_close(rgb, g2.rgb(v, frames), rtol=0, atol=0)
    # a frame alone equals the same frame rendered inside a longer request
    torch.testing.assert_close(g1.rgb(v, [40])[0], rgb[2], rtol=0, atol=0)
    assert not torch.equal(_gen(size=16, seed=4).rgb(v, frames), rgb)
    assert g1.n_frames(v) == 72


def test_content_carries_labels_through_patterns():
    g = _gen(size=16, noise_sigma=0.0)  # no noise: the signal is exactly the patterns
    v = Video("X", "Garage", 3.0, (Instance(5, 0.0, 3.0),))
    p = g.patterns("rgb")
    labels = g.labels  # derived mapping: object/verb exist without a mapping file
    frames = np.array([1, 60])  # t = 0 (start third) and t = 59/24 (end third)
    x = g.rgb(v, frames).reshape(2, -1)
    scene = SCENES.index("Garage")
    for row, prog in zip(x, (0, 2)):
        want = (p["category"][5] + p["object"][labels.class_object[5]]
                + p["verb"][labels.class_verb[5]] + p["progress"][prog] + p["scene"][scene])
        torch.testing.assert_close(row, want)


def _matched_filter_accuracy(g, videos, n_avg):
    pats = g.patterns("rgb")["category"].double()
    single, averaged = [], []
    for v in videos:
        a = v.actions[0]
        frames = np.floor(np.linspace(a.start, a.end, n_avg + 2)[1:-1] * 24).astype(int) + 1
        x = g.rgb(v, frames).reshape(n_avg, -1).double()
        scores = (x[:, None, :] * pats[None]).sum(-1)  # [n_avg, 157]
        single.extend((scores.argmax(1) == a.cls).tolist())
        averaged.append(int(scores.mean(0).argmax()) == a.cls)
    return np.mean(single), np.mean(averaged)


def test_one_frame_is_ambiguous_but_the_sequence_is_not():
    rng = np.random.default_rng(0)
    videos = [Video(f"V{i}", "Kitchen", 10.0, (Instance(int(c), 1.0, 9.0),))
              for i, c in enumerate(rng.integers(0, 157, 40))]
    single, averaged = _matched_filter_accuracy(_gen(size=16), videos, 8)
    # an oracle that knows the patterns: one frame often wrong, 8 frames almost never
    assert single < 0.5 and averaged > 0.85  # measured: 0.24 and 0.96 on 200 videos


def test_bad_config_and_stream():
    with pytest.raises(FieldlibError):
        _gen(size=2)
    with pytest.raises(FieldlibError, match="unknown stream"):
        _gen(size=8).render("depth", Video("X", "K", 1.0, ()), [1])


def _reference_frame(g, stream, video, frame):
    """The module docstring's sum for one frame, written out from frame_labels (the
    per-video renderer the batch renderer replaced), with the noise of a lone frame."""
    _, (p_c, p_o, p_v, p_p, p_s) = g._streams[stream]
    active, progress = frame_labels(video, [(frame - 1) / g.config.fps], g.labels.n_classes)
    x = torch.zeros(p_c.shape[1])
    classes = np.flatnonzero(active[0])
    for c in classes:  # in the order the renderer adds them: classes, objects, verbs, ...
        x += p_c[c]
    for table, pats in ((g.labels.class_object, p_o), (g.labels.class_verb, p_v)):
        for k in np.unique(table[classes]):
            x += pats[k]
    for k in np.unique(progress[0, classes]):
        x += p_p[k]
    if g.scenes.get(video.scene, -1) >= 0:
        x = x + p_s[g.scenes.get(video.scene)]
    return x + g._noise(stream, [video], np.array([frame]), x.numel())[0]


def test_render_many_equals_the_sum_frame_by_frame():
    """The batch renderer (one program over many videos) gives the bits of the per-frame
    sum: repeated videos, a class covered twice at once (the first-listed instance's
    progress), a video without actions, an unknown scene, both streams."""
    videos = [
        Video("AB12C", "Kitchen", 3.0, (Instance(5, 0.0, 2.0), Instance(9, 1.0, 3.0))),
        Video("TWICE", "Garage", 4.0, (Instance(7, 0.5, 3.5), Instance(7, 0.0, 1.2),
                                       Instance(12, 0.0, 4.0))),
        Video("EMPTY", "Bedroom", 2.0, ()),
        Video("NOWHERE", "Moon", 2.5, (Instance(3, 0.0, 2.5),)),
    ]
    g = _gen(size=8, seed=5)
    rng = np.random.default_rng(0)
    for stream in ("rgb", "flow"):
        pick = np.r_[rng.integers(0, len(videos), 39), 1]
        frames = np.array([rng.integers(1, g.n_frames(videos[k]) + 1) for k in pick[:-1]]
                          + [20])  # TWICE at 0.79 s: class 7 covered by both instances
        many = g.render_many(stream, [videos[k] for k in pick], frames)
        one = torch.stack([_reference_frame(g, stream, videos[k], f).reshape(many.shape[1:])
                           for k, f in zip(pick, frames)])
        assert many.shape == (40, 3 if stream == "rgb" else 20, 8, 8)
        assert torch.equal(many, one), stream
    assert g.render_many("rgb", [], []).shape == (0, 3, 8, 8)
    with pytest.raises(FieldlibError, match="2 videos for 1 frames"):
        g.render_many("rgb", videos[:2], [1])
    with pytest.raises(FieldlibError, match="unknown stream"):
        g.render_many("depth", videos[:1], [1])
