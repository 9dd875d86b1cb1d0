import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fieldlib.errors import FieldlibError
from fieldlib.models.charades import (
    Annotations,
    CharadesFrames,
    CharadesVideos,
    FolderSource,
    Instance,
    SyntheticCharades,
    SyntheticConfig,
    SyntheticSource,
    Video,
    build_state_space,
    collate_videos,
    load_labels,
    scene_vocabulary,
    write_jpeg_folders,
)

VIDEOS = Annotations([
    Video("AAA01", "Kitchen", 2.0, (Instance(3, 0.0, 1.5), Instance(8, 1.0, 2.0))),
    Video("BBB02", "Garage", 1.0, (Instance(8, 0.25, 0.75),)),
    Video("CCC03", "Kitchen", 0.5, ()),
])
SCENES = scene_vocabulary(["Garage", "Kitchen"])


@pytest.fixture(scope="module")
def synth():
    labels = load_labels().with_derived_mapping()
    gen = SyntheticCharades(labels, SCENES, SyntheticConfig(size=8, seed=1))
    return labels, SyntheticSource(gen)


def test_frame_dataset_over_synthetic(synth):
    labels, source = synth
    space = build_state_space(VIDEOS, labels, fps=8)
    ds = CharadesFrames(VIDEOS, source, labels, SCENES, fps=8, state_space=space)
    # AAA01: 0..1.5 -> 13 frames of c003, 1..2 -> 8 frames (t < 2) of c008; BBB02: 5 frames
    assert len(ds) == 13 + 8 + 5
    item = ds[0]
    assert item["rgb"].shape == (3, 8, 8) and item["flow"].shape == (20, 8, 8)
    assert item["label"].item() == 3 and item["progress"].item() == 0
    assert item["object"].item() == labels.class_object[3] and item["scene"].item() == 1
    assert item["state"].item() == space.lookup[3, 0] and item["frame"].item() == 1
    assert item["video"] == "AAA01" and item["labels"].shape == (157,)
    # the sample's frame is the generator's frame at that time (8 fps = every 3rd jpg)
    last = ds[len(ds) - 1]
    assert last["video"] == "BBB02" and last["time"].item() == 0.75
    assert last["frame"].item() == 19 and last["progress"].item() == 2
    torch.testing.assert_close(last["rgb"], source.rgb(VIDEOS[1], [19])[0])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["rgb"].shape == (4, 3, 8, 8) and batch["label"].shape == (4,)
    one = CharadesFrames(VIDEOS, source, labels, SCENES, fps=8, one_per_frame=True,
                         streams=("rgb",))
    assert len(one) == 16 + 5 and "flow" not in one[0]  # 16 frames of AAA01 have a label


def test_video_dataset_and_collate(synth):
    labels, source = synth
    ds = CharadesVideos(VIDEOS, source, labels, SCENES)
    item = ds[0]
    assert item["rgb"].shape == (25, 3, 8, 8) and item["flow"].shape == (25, 20, 8, 8)
    np.testing.assert_array_equal(item["time"].numpy(), (np.arange(25) / 25) * 2.0)
    assert item["labels"].shape == (25, 157) and item["video_labels"].sum() == 2
    assert item["label"][0].item() == 3 and item["label"][-1].item() == 8
    assert item["labels"][13, 3] and item["labels"][13, 8]  # t = 1.04: both active
    empty = ds[2]
    assert (empty["label"] == -1).all() and not empty["labels"].any()
    sync = CharadesVideos(VIDEOS, source, labels, SCENES, times=8, streams=("rgb",))
    batch = collate_videos([sync[0], sync[1], sync[2]])
    assert batch["rgb"].shape == (3, 16, 3, 8, 8)
    assert batch["mask"].sum(1).tolist() == [16, 8, 4]
    assert (batch["label"][1, 8:] == -1).all() and not batch["labels"][2, 4:].any()
    assert batch["video"] == ["AAA01", "BBB02", "CCC03"] and batch["scene"].tolist() == [1, 0, 1]
    capped = CharadesVideos(VIDEOS, source, labels, SCENES, times=8, max_frames=5)
    assert capped[0]["time"].shape == (5,)


def test_folder_source_reads_official_layout(tmp_path):
    # hand-made frames: rgb value encodes the frame number, flow x/y distinct constants
    for f in range(1, 5):
        d = tmp_path / "rgb" / "AAA01"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 40 * f, np.uint8)).save(d / f"AAA01-{f:06d}.jpg",
                                                                   quality=100)
        d = tmp_path / "flow" / "AAA01"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6), 10 * f, np.uint8)).save(d / f"AAA01-{f:06d}x.jpg",
                                                                quality=100)
        Image.fromarray(np.full((6, 6), 200, np.uint8)).save(d / f"AAA01-{f:06d}y.jpg",
                                                             quality=100)
    src = FolderSource(tmp_path / "rgb", tmp_path / "flow", size=4, mean=0.0, std=1 / 255)
    v = VIDEOS[0]
    assert src.n_frames(v) == 4
    rgb = src.rgb(v, [2, 4])
    assert rgb.shape == (2, 3, 4, 4)
    assert abs(rgb[0].mean().item() - 80) < 2 and abs(rgb[1].mean().item() - 160) < 2
    flow = src.flow(v, [3])
    assert flow.shape == (1, 20, 4, 4)
    means = flow[0].mean(dim=(1, 2))
    # channels x3, y3, x4, y4, then frame 4 repeated (clipped to the last flow frame)
    assert [round(m) for m in means[0:6:2].tolist()] == [30, 40, 40]
    assert all(abs(m - 200) < 2 for m in means[1::2].tolist())
    ds = CharadesVideos(Annotations([v]), src, load_labels(), SCENES)
    assert ds[0]["frame"].max().item() == 4  # clipped to the frames on disk
    with pytest.raises(FieldlibError, match="no frame folder for video BBB02"):
        src.n_frames(VIDEOS[1])


def test_synthetic_folders_round_trip(tmp_path, synth):
    labels, source = synth
    gen = source.generator
    n = write_jpeg_folders(gen, [VIDEOS[1]], tmp_path / "rgb", tmp_path / "flow")
    assert n == 24 * 3  # 24 frames, rgb + flow x + flow y
    folder = FolderSource(tmp_path / "rgb", tmp_path / "flow")
    got = folder.rgb(VIDEOS[1], [5, 12])
    want = gen.rgb(VIDEOS[1], [5, 12])
    # JPEG keeps the synthetic content (8 x 8 is below JPEG's block size: loose bound)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9
    ds = CharadesFrames(Annotations([VIDEOS[1]]), folder, labels, SCENES)
    assert ds[0]["rgb"].shape == (3, 8, 8)
