"""The two-stream network (models/charades/network.py, backbones.py): head shapes, options,
VGG-16 weights and flow widening, gradients, and a tiny overfitting run on synthetic frames.

No official file is needed: the state space comes from a few hand-made annotation rows with
the derived class mapping. VGG-16 runs at most three forward passes (batch <= 2, 224 px).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fieldlib.errors import FieldlibError, FormatError, ShapeError
from fieldlib.models.charades import (
    Annotations,
    CharadesFrames,
    Instance,
    SyntheticCharades,
    SyntheticConfig,
    SyntheticSource,
    Video,
    build_state_space,
    load_labels,
    scene_vocabulary,
)
from fieldlib.models.charades.backbones import (
    SmallBackbone,
    VGG16Backbone,
    make_backbone,
    widen_first_conv,
)
from fieldlib.models.charades.network import HEAD_NAMES, FrameHeads, StreamNet

SCENES = scene_vocabulary(["Bedroom", "Garage", "Kitchen"])
VIDEOS = Annotations([
    Video("AAA01", "Kitchen", 3.0, (Instance(3, 0.0, 2.0), Instance(8, 1.0, 3.0))),
    Video("BBB02", "Garage", 2.0, (Instance(8, 0.25, 1.75), Instance(40, 0.0, 2.0))),
    Video("CCC03", "Bedroom", 2.0, (Instance(77, 0.0, 2.0),)),
])
O, V = 38, 33


@pytest.fixture(scope="module")
def labels():
    return load_labels().with_derived_mapping()


@pytest.fixture(scope="module")
def space(labels):
    return build_state_space(VIDEOS, labels, fps=8, scenes=SCENES)


def _frames(stream, n=4, size=32, seed=0):
    c = 3 if stream == "rgb" else 20
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# -- shapes and options ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", ["rgb", "flow"])
@pytest.mark.parametrize("component", ["object", "object_progress"])
@pytest.mark.parametrize("progress", [True, False])
def test_head_shapes(space, stream, component, progress):
    torch.manual_seed(0)
    net = StreamNet(space, stream, n_intents=7, component=component, progress=progress)
    heads = net(_frames(stream))
    p = 3 if progress else 1
    d = O * p if component == "object_progress" else O
    assert net.n_progress == p and net.component_size == d
    assert heads.phi_op.shape == (4, O, p) and heads.phi_ap.shape == (4, V, p)
    assert heads.phi_os.shape == (4, O, len(SCENES))
    assert heads.phi_b.shape == (4, net.n_states) and heads.phi_xi.shape == (4, d, 7)
    assert net.mu.shape == (d, d) and net.kernel_weights.shape == (1,)
    states, index = net.states.numpy(), net.state_index.numpy()
    if progress:
        np.testing.assert_array_equal(states, space.states)
        assert net.n_states == space.size
    else:  # one row per distinct (c, o, a); every row of B maps to its (c, o, a)
        assert (states[:, 3] == 0).all() and len(np.unique(states, axis=0)) == len(states)
        np.testing.assert_array_equal(states[index, :3], space.states[:, :3])
        assert net.n_states == len(np.unique(space.states[:, 0])) < space.size


def test_view_and_flatten(space):
    net = StreamNet(space).eval()
    x = _frames("rgb", 6)
    heads = net(x)
    video = heads.view(2, 3)
    assert video.batch_shape == (2, 3) and video.phi_xi.shape == (2, 3, O, 30)
    torch.testing.assert_close(video.phi_b[1, 2], heads.phi_b[5])  # video-major
    for a, b in zip(video.flatten().tensors().values(), heads.tensors().values()):
        torch.testing.assert_close(a, b)
    # batch of frames == frames one at a time (eval mode: BatchNorm running statistics)
    torch.testing.assert_close(net(x[4:5]).phi_op[0], heads.phi_op[4])
    with pytest.raises(ShapeError, match="needs flat heads of 8 frames"):
        heads.view(2, 4)
    with pytest.raises(ShapeError):
        video.view(2, 3)
    assert set(heads.tensors()) == {"phi_op", "phi_ap", "phi_os", "phi_b", "phi_xi"}
    assert isinstance(heads, FrameHeads)


def test_scene_weight(space):
    x = _frames("rgb")
    out = {}
    for w in (1.0, 2.5, 0.0):
        torch.manual_seed(3)
        out[w] = (StreamNet(space, scene_weight=w).eval(), )
        out[w] += (out[w][0](x),)
    torch.testing.assert_close(out[2.5][1].phi_os, 2.5 * out[1.0][1].phi_os)
    torch.testing.assert_close(out[2.5][1].phi_b, out[1.0][1].phi_b)
    zero_net, zero = out[0.0]
    assert zero.phi_os.shape == (4, O, len(SCENES)) and not zero.phi_os.any()
    assert zero_net.phi_os is None and zero_net.head_parameters()["phi_os"] == []


def test_head_parameters_partition_the_module(space):
    for kw in ({}, {"scene_weight": 0.0}, {"learn_kernel_weights": False}):
        net = StreamNet(space, **kw)
        groups = net.head_parameters()
        assert tuple(groups) == HEAD_NAMES
        ids = [id(p) for ps in groups.values() for p in ps]
        assert len(ids) == len(set(ids)) == len(list(net.parameters()))
        assert groups["mu"] == [net.mu] and groups["kernel"] == [net.kernel_weights]
    assert not net.kernel_weights.requires_grad
    assert StreamNet(space, sigmas=3.0).sigmas == (3.0,)


def test_input_checks(space):
    rgb, flow = StreamNet(space, "rgb"), StreamNet(space, "flow")
    with pytest.raises(ShapeError, match="expected 20 channels, got 3"):
        flow(_frames("rgb"))
    with pytest.raises(ShapeError, match="expected 3 channels, got 20"):
        rgb(_frames("flow"))
    with pytest.raises(ShapeError, match=r"expected frames \(B, 3, H, W\), got \(2, 4, 3"):
        rgb(torch.zeros(2, 4, 3, 32, 32))
    with pytest.raises(ShapeError, match="sides >= 8"):
        rgb(torch.zeros(2, 3, 4, 32))
    rgb(torch.zeros(1, 3, 8, 8)).phi_b.sum().backward()  # one small frame still trains


def test_option_errors(space, labels):
    plain = build_state_space(VIDEOS, load_labels(), fps=8, scenes=SCENES)
    with pytest.raises(FieldlibError, match=r"with_derived_mapping\(\)"):
        StreamNet(plain)
    bad = [({"stream": "depth"}, "unknown stream"), ({"component": "verb"}, "component"),
           ({"backbone": "resnet"}, "unknown backbone 'resnet'; known: small, vgg16"),
           ({"n_intents": 0}, "n_intents"), ({"sigmas": (0.0,)}, "sigma > 0"),
           ({"sigmas": ()}, "at least one"), ({"scene_weight": float("nan")}, "scene_weight"),
           ({"dropout": 1.5}, "dropout"), ({"backbone_options": {"depth": 3}}, "bad options")]
    for kw, msg in bad:
        with pytest.raises(FieldlibError, match=msg):
            StreamNet(space, **kw)
    with pytest.raises(FieldlibError, match="in_channels = 20"):
        StreamNet(space, "flow", backbone=SmallBackbone(3))
    net = StreamNet(space, "flow", backbone=SmallBackbone(20, features=16))
    assert net(_frames("flow", 2)).phi_b.shape == (2, space.size)


# -- gradients --------------------------------------------------------------------------------

def _backbone_grad(net):
    return sum(float(p.grad.abs().sum()) for p in net.backbone.parameters()
               if p.grad is not None)


@pytest.mark.parametrize("detach", [False, True])
def test_detach_intent(space, detach):
    torch.manual_seed(0)
    net = StreamNet(space, detach_intent=detach)
    net(_frames("rgb")).phi_xi.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in net.head_parameters()["phi_xi"])
    assert (_backbone_grad(net) == 0.0) == detach
    net.zero_grad(set_to_none=True)
    net(_frames("rgb")).phi_op.square().sum().backward()  # other heads reach the trunk
    assert _backbone_grad(net) > 0


def test_mu_and_kernel_weights_learn_through_the_field(space):
    """The heads, µ and kernel() plug into fieldlib's factors; the mean-field ELBO sends
    gradient to every head, to µ and (once µ != 0) to the kernel weights (KernelSum keeps
    tensor weights' gradient)."""
    from fieldlib.factors import Component, FrameIntent, KernelTemporal
    from fieldlib.graph import FactorGraph
    from fieldlib.inference import get_engine
    from fieldlib.variables import BlockDomain

    torch.manual_seed(0)
    net = StreamNet(space, n_intents=4, sigmas=(1.0, 4.0))
    t = 5
    heads = net(_frames("rgb", t))
    with torch.no_grad():
        net.mu.normal_(0.0, 0.5)
    dom = BlockDomain({"c": 157, "o": O, "a": V, "p": 3}, net.states)
    g = FactorGraph()
    x = g.array("x", t, dom)
    intent = g.variable("I", net.n_intents)
    g.add(Component(x, ("o", "p"), heads.phi_op), Component(x, ("a", "p"), heads.phi_ap),
          Component(x, ("c", "o", "a", "p"), heads.phi_b, configs=net.states),
          FrameIntent(x, intent, heads.phi_xi, component="o"),
          KernelTemporal(x, net.mu, times=torch.arange(t) * 0.5, kernel=net.kernel(),
                         component="o"))
    get_engine("meanfield")(g).elbo.sum().backward()
    for name, params in net.head_parameters().items():
        if name != "phi_os":  # no scene factor in this graph
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    k = net.kernel()
    delta = torch.tensor([0.0, 1.0])
    want = net.kernel_weights[0] * torch.exp(-delta**2 / 2) \
        + net.kernel_weights[1] * torch.exp(-delta**2 / 32)
    torch.testing.assert_close(k(delta), want)


# -- a tiny training run on synthetic frames --------------------------------------------------

def test_small_backbone_overfits_synthetic_frames(space, labels):
    gen = SyntheticCharades(labels, SCENES, SyntheticConfig(size=32, seed=5))
    ds = CharadesFrames(VIDEOS, SyntheticSource(gen), labels, SCENES, fps=8,
                        state_space=space, streams=("rgb",))
    rng = np.random.default_rng(0)
    items = [ds[int(i)] for i in rng.choice(len(ds), 16, replace=False)]
    x = torch.stack([it["rgb"] for it in items])
    target = torch.stack([it["state"] for it in items]).long()
    assert (target >= 0).all()
    torch.manual_seed(0)
    net = StreamNet(space)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(net(x).phi_b, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -- VGG-16: flow widening, weights files ------------------------------------------------------

def _fake_vgg16_state(seed=0):
    """A torchvision vgg16 state_dict that costs almost nothing to save: conv1 random, every
    other tensor one distinct constant (an expanded scalar, stored as one number), so that a
    round trip checks each key lands in its own place."""
    from torchvision.models import vgg16

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in vgg16(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.tensor(float(i + 1)).expand(s) for i, (k, s) in enumerate(shapes.items())}
    state["features.0.weight"] = torch.randn(shapes["features.0.weight"], generator=gen)
    state["features.0.bias"] = torch.randn(64, generator=gen)
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    state = _fake_vgg16_state()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path, state


def test_vgg16_flow_conv1_is_the_rgb_conv1_averaged():
    from torchvision.models import vgg16

    torch.manual_seed(0)
    ref = vgg16(weights=None).features[0]
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random initialisation"):
        flow = make_backbone("vgg16", 20)
    conv = flow.features[0]
    assert conv.weight.shape == (64, 20, 3, 3) and flow.out_features == 4096
    torch.testing.assert_close(conv.weight,
                               ref.weight.mean(1, keepdim=True).repeat(1, 20, 1, 1))
    torch.testing.assert_close(conv.bias, ref.bias)
    torch.testing.assert_close(widen_first_conv(ref, 20).weight, conv.weight)
    with torch.device("meta"):
        keys = set(vgg16(weights=None).state_dict())
    assert set(flow.state_dict()) == keys - {"classifier.6.weight", "classifier.6.bias"}


def test_vgg16_weights_round_trip_and_heads(space, vgg_file):
    path, state = vgg_file
    conv1 = state["features.0.weight"]
    nets = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a weights file: no random-init warning
        for stream in ("rgb", "flow"):
            nets[stream] = StreamNet(space, stream, "vgg16", weights=path).eval()
    for stream, net in nets.items():
        loaded = net.backbone.state_dict()
        assert set(loaded) == set(state) - {"classifier.6.weight", "classifier.6.bias"}
        for k, v in loaded.items():
            if k != "features.0.weight":
                assert torch.equal(v, state[k]), (stream, k)
    assert torch.equal(nets["rgb"].backbone.features[0].weight, conv1)
    torch.testing.assert_close(nets["flow"].backbone.features[0].weight,
                               conv1.mean(1, keepdim=True).repeat(1, 20, 1, 1))
    # random-ish frames: the fake weights make features constant, shapes are what counts
    with torch.no_grad():
        rgb = nets["rgb"](torch.randn(2, 3, 224, 224))
        flow = nets["flow"](torch.randn(1, 20, 224, 224))
    assert rgb.phi_b.shape == (2, space.size) and rgb.phi_xi.shape == (2, O, 30)
    assert flow.phi_op.shape == (1, O, 3) and flow.phi_os.shape == (1, O, len(SCENES))
    assert nets["rgb"].phi_op.in_features == 4096


def test_vgg16_loads_a_flow_state_dict_as_is(space, tmp_path):
    state = _fake_vgg16_state(seed=1)
    state["features.0.weight"] = torch.randn(64, 20, 3, 3)
    del state["classifier.6.weight"], state["classifier.6.bias"]  # optional
    torch.save(state, tmp_path / "flow.pth")
    net = VGG16Backbone(20, weights=tmp_path / "flow.pth")
    assert torch.equal(net.features[0].weight, state["features.0.weight"])


def test_bad_weights_files_name_the_file(tmp_path):
    from torchvision.models import resnet18

    cases = []
    missing = tmp_path / "absent.pth"
    cases.append((missing, FieldlibError, "no such file"))
    cases.append((tmp_path, FieldlibError, "is a directory"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 50)
    cases.append((garbage, FormatError, "not a torch state_dict"))
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    cases.append((listing, FormatError, "holds a list"))
    other = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), other)
    cases.append((other, FieldlibError, "not a torchvision vgg16 state_dict: missing keys 30"))
    shaped = tmp_path / "shape.pth"
    state = _fake_vgg16_state()
    state["classifier.3.weight"] = torch.zeros(()).expand(10, 4096)
    del state["features.28.bias"]
    torch.save(state, shaped)
    cases.append((shaped, FieldlibError,
                  r"missing keys 1: features\.28\.bias; wrong shapes 1: classifier\.3\.weight:"
                  r" expected \(4096, 4096\), got \(10, 4096\)"))
    for path, error, msg in cases:
        for stream in ("rgb", "flow"):
            with pytest.raises(error, match=msg) as info:
                make_backbone("vgg16", 3 if stream == "rgb" else 20, weights=path)
            assert str(path) in str(info.value)
    small = tmp_path / "small.pth"
    torch.save(SmallBackbone(3, widths=(8, 8, 8)).state_dict(), small)
    with pytest.raises(FieldlibError, match="wrong shapes") as info:
        make_backbone("small", 3, weights=small)
    assert str(small) in str(info.value)
    assert make_backbone("small", 3, widths=(8, 8, 8), weights=small).out_features == 256
