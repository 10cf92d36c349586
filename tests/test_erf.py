"""``rapidnet erf`` and ``rapidnet.analysis.erf``: ERF maps, their squares and the theoretical receptive field, checked
on networks whose answer is known by hand (single convs, dilations, 1x1 stacks, RapidNet's stem and stages)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import rapidnet
from conftest import MICRO, randomize_, run_cli
from rapidnet.analysis import (
    build_model,
    erf_centre,
    erf_fractions,
    input_gradient_map,
    load_images,
    measure_erf,
    model_normalization,
    plot_erf,
    receptive_field,
    stage_features,
    theoretical_rf,
)
from rapidnet.errors import ConfigError, DataError

#: a micro RapidNet as a dense model's backbone (no head)
MICRO_BACKBONE = {k: v for k, v in MICRO.items() if k != "head_dim"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three small PNGs (RGB of two sizes and a greyscale one), one in a sub-folder."""
    root = tmp_path_factory.mktemp("erf_images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(root / "sub" / "c.png")
    return root


def positive_conv(in_chs: int, out_chs: int, kernel: int, dilation: int = 1) -> nn.Conv2d:
    """A conv with strictly positive weights: with positive images every tap has a non-zero input gradient."""
    conv = nn.Conv2d(in_chs, out_chs, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.1)
    return conv


def nonzero_offsets(grad_map: np.ndarray) -> set[tuple[int, int]]:
    """Pixels with a non-zero gradient, relative to the centre (H//2, W//2)."""
    h, w = grad_map.shape
    return {(int(y) - h // 2, int(x) - w // 2) for y, x in zip(*np.nonzero(grad_map), strict=True)}


def smallest_odd_side(t: float, side: int) -> int:
    """The odd square side holding ``t`` of a uniform ``side`` x ``side`` map (clipped at the map)."""
    s = 1
    while s * s < t * side * side:
        s += 2
    return min(s, side)


# ---- single layers: the answer by hand ------------------------------------------------------------------------------


def test_single_3x3_conv_rf_is_3_and_its_erf_is_the_window():
    conv = positive_conv(3, 4, 3)
    assert theoretical_rf(conv) == 3
    grad = input_gradient_map(conv, torch.rand(2, 3, 16, 16))
    assert grad.dtype == np.float64 and grad.shape == (16, 16)
    assert nonzero_offsets(grad) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


@pytest.mark.parametrize("dilation, side", [(2, 5), (3, 7)])
def test_dilated_conv_rf_and_the_nine_dilated_taps(dilation, side):
    conv = positive_conv(3, 2, 3, dilation)
    assert theoretical_rf(conv) == side
    grad = input_gradient_map(conv, torch.rand(1, 3, 17, 17))
    taps = {(dy * dilation, dx * dilation) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert nonzero_offsets(grad) == taps  # the 9 taps only: the holes between them have no gradient


def test_network_of_1x1_convs_sees_one_pixel():
    net = nn.Sequential(positive_conv(3, 8, 1), nn.ReLU(), positive_conv(8, 4, 1))
    assert theoretical_rf(net) == 1
    grad = input_gradient_map(net, torch.rand(2, 3, 20, 20))
    assert nonzero_offsets(grad) == {(0, 0)}
    fractions = erf_fractions(grad)
    assert fractions == {"t20": 1 / 20, "t50": 1 / 20, "t90": 1 / 20, "t99": 1 / 20}


def test_two_stacked_3x3_convs_and_a_max_pool():
    stacked = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1))
    assert theoretical_rf(stacked) == 5
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    assert theoretical_rf(pooled) == 5  # the pool's whole 3x3 window counts, not the pixel the max picked
    assert isinstance(pooled[2], nn.MaxPool2d) and pooled[0].weight.dtype == torch.float32  # measured on a copy


def test_a_global_receptive_field_is_clipped_at_the_cap():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    rf = receptive_field(net, cap=64)
    assert rf.clipped and rf.side == 64 and rf.probe == 64
    local = receptive_field(nn.Conv2d(3, 4, 5, padding=2), cap=64)
    assert not local.clipped and (local.side, local.height, local.width, local.probe) == (5, 5, 5, 32)


def test_gradient_map_sums_images_and_restores_the_module():
    conv = positive_conv(3, 4, 3).train()
    image = torch.rand(1, 3, 16, 16)
    one = input_gradient_map(conv, image)
    two = input_gradient_map(conv, image.repeat(3, 1, 1, 1), batch_size=2)
    np.testing.assert_allclose(two, 3 * one, rtol=1e-6)  # a sum over images, batch by batch
    assert conv.training and conv.weight.requires_grad and conv.weight.grad is None


# ---- the RF by arithmetic over the traced graph, against the probe --------------------------------------------------


class Residual(nn.Module):
    """``x + f(x)``: the union of the shortcut's pixel and the branch's window."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class DilatedBranches(nn.Module):
    """RapidNet's MLDC in small: parallel 3x3 convs of several dilations, summed (the widest one decides)."""

    def __init__(self, chs: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(chs, chs, 3, padding=d, dilation=d) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class SkipUp(nn.Module):
    """A stride-2 path upsampled (nearest) back onto a full-resolution one, added, then a channel concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1))
        self.full = nn.Conv2d(3, 4, 5, padding=2)
        self.side = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.down(x), scale_factor=2.0, mode="nearest")
        return torch.cat([self.full(x) + up, self.side(x)], dim=1)


class ChannelsLast(nn.Module):
    """ConvNeXt's pattern: a depthwise conv, then NHWC for a LayerNorm and a linear layer over channels, then NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 7, padding=3, groups=3)
        self.norm, self.fc = nn.LayerNorm(3), nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        return F.gelu(y).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """A conv gated by its own global mean: every output depends on every input pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))


def conv_net(*layers: tuple[int, int, int, int | str]) -> nn.Sequential:
    """Convs of (kernel, stride, dilation, padding) with GELUs between (non-zero gradient almost everywhere)."""
    modules: list[nn.Module] = []
    chs = 3
    for kernel, stride, dilation, padding in layers:
        modules += [nn.Conv2d(chs, 4, kernel, stride, padding, dilation), nn.GELU()]
        chs = 4
    return nn.Sequential(*modules[:-1])


SMALL_NETS = {
    "strided convs": lambda: conv_net((3, 2, 1, 1), (3, 2, 1, 1), (5, 1, 1, 2)),
    "dilated convs": lambda: conv_net((3, 1, 2, 2), (3, 2, 1, 1), (3, 1, 3, 3)),
    "no padding": lambda: conv_net((3, 1, 1, 0), (4, 2, 1, 0), (3, 1, 2, 0)),
    "odd padding": lambda: conv_net((5, 2, 1, 1), (3, 3, 1, 2), (2, 1, 1, "same")),
    "asymmetric padding": lambda: nn.Sequential(nn.ZeroPad2d((1, 3, 0, 2)), nn.Conv2d(3, 4, 3, 2), nn.GELU()),
    "pools": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
    ),
    "ceil-mode pool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.MaxPool2d(3, 2, ceil_mode=True)),
    "residual adds": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1))),
        Residual(nn.Conv2d(4, 4, 5, padding=4, dilation=2)),
    ),
    "parallel dilated branches": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), DilatedBranches(4, (2, 3)), nn.GELU(), DilatedBranches(4, (1, 5))
    ),
    "upsampling and concatenation": SkipUp,
    "channels last": ChannelsLast,
    "adaptive pool": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(5)),
    "squeeze-excitation": SqueezeExcite,
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("start", [32, 19])
@pytest.mark.parametrize("name", list(SMALL_NETS))
def test_graph_rf_is_the_probes_on_small_nets(name, start):
    """The whole answer (side, box, probe size, clipped) is the probe's, on probe sizes with odd maps too (19, 38,
    ...); the arithmetic needs no gradient and no float64 copy."""
    torch.manual_seed(0)
    net = SMALL_NETS[name]().eval()
    graph = receptive_field(net, method="graph", start=start, cap=160)
    probe = receptive_field(net, method="probe", start=start, cap=160)
    assert (graph.method, probe.method) == ("graph", "probe")
    assert graph == probe


MICRO_CONFIGS = {
    "paper": {},
    "mldc 1 1": {"mldc_dilations": (1, 1)},
    "mldc 1 2 4, ffn 5": {"mldc_dilations": (1, 2, 4), "ffn_kernel": 5},
    "depthwise mldc": {"mldc_groups": "depthwise"},
    "reparameterized": {"inference_mode": True},
}


@pytest.mark.parametrize("config", list(MICRO_CONFIGS))
def test_graph_rf_is_the_probes_on_micro_rapidnets(config):
    """Every stage of a micro RapidNet with non-trivial BN statistics and layer scales: stage 2 whole within the cap,
    stage 3 clipped (the box at the cap compared too)."""
    torch.manual_seed(0)
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=0, **MICRO, **MICRO_CONFIGS[config])).eval()
    for stage, feat in stage_features(model, [0, 1, 2, 3]).items():
        graph = receptive_field(feat, method="graph", cap=512)
        assert graph == receptive_field(feat, method="probe", cap=512), f"stage {stage}"
        assert graph.clipped == (stage == 3)


def test_graph_rf_is_the_probes_on_rapidnet_ti():
    """The real RapidNet-Ti, at a cap where the probe is cheap: stages 0 and 1 whole, 2 and 3 clipped at 128."""
    torch.manual_seed(0)
    model = rapidnet.create_model("rapidnet_ti", num_classes=0)
    for stage, feat in stage_features(model, [0, 1, 2, 3]).items():
        graph = receptive_field(feat, method="graph", cap=128)
        assert graph == receptive_field(feat, method="probe", cap=128), f"stage {stage}"
        assert graph.clipped == (stage >= 2)


def rapidnet_rf_by_hand(depths, dilations=(2, 3), ffn_kernel=7) -> list[int]:
    """The RF of each stage by the textbook recurrence ``r += (k - 1) * d * j``, ``j *= s``: a stem of two 3x3
    stride-2 convs; per stage a 3x3 stride-2 downsample (not in stage 0), a depthwise 3x3 per Inverted Residual
    block, and per Dilated Conv block a 7x7 CPE, the widest MLDC branch and the FFN's depthwise conv."""
    r, j, sides = 1, 1, []
    for _ in range(2):
        r, j = r + 2 * j, 2 * j
    for stage, (num_ir, num_dc) in enumerate(depths):
        if stage > 0:
            r, j = r + 2 * j, 2 * j
        r += num_ir * 2 * j + num_dc * (6 + 2 * max(dilations) + ffn_kernel - 1) * j
        sides.append(r)
    return sides


@pytest.mark.parametrize(
    "variant, kwargs",
    [("rapidnet_ti", {}), ("rapidnet_s", {}), ("rapidnet_ti", {"mldc_dilations": (1, 1)}),
     ("rapidnet_ti", {"mldc_dilations": (2, 5), "ffn_kernel": 5})],
)  # fmt: skip
def test_graph_rf_of_full_rapidnets_is_the_recurrence(variant, kwargs):
    """Full-size RapidNets, every stage whole under a large cap: the recurrence by hand. Under the default cap (the
    probe's 1,024) RapidNet-Ti's stages 0..2 are whole and stage 3 is clipped, as the probe reported them."""
    model = rapidnet.create_model(variant, num_classes=0, **kwargs)
    config = rapidnet.models.rapidnet.VARIANTS[variant]
    expected = rapidnet_rf_by_hand(config["depths"], kwargs.get("mldc_dilations", (2, 3)), kwargs.get("ffn_kernel", 7))
    feats = stage_features(model, [0, 1, 2, 3])
    found = [receptive_field(f, method="graph", cap=8192) for f in feats.values()]
    assert [(rf.side, rf.height, rf.width, rf.clipped) for rf in found] == [(r, r, r, False) for r in expected]
    if variant == "rapidnet_ti" and not kwargs:
        default = [receptive_field(f) for f in feats.values()]
        assert [(rf.side, rf.clipped, rf.method) for rf in default] == [
            *((r, False, "graph") for r in expected[:3]),
            (1024, True, "graph"),
        ]


def test_graph_rf_sees_what_the_probe_misses():
    """A lone conv dilated by 20 on the 32-pixel probe: only its centre tap falls inside, so the probe reports 1
    pixel; the arithmetic grows the input until the whole 41-pixel window fits."""
    conv = nn.Conv2d(3, 4, 3, padding=20, dilation=20)
    assert receptive_field(conv, method="probe").side == 1
    rf = receptive_field(conv, method="graph")
    assert (rf.side, rf.probe, rf.clipped) == (41, 64, False)


def test_graph_rf_falls_back_to_the_probe_for_ops_it_does_not_model():
    class Bilinear(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, scale_factor=2.0, mode="bilinear")

    class Tokens(nn.Module):  # a reshape of the map: the spatial layout is lost to the arithmetic
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            return x.flatten(2).reshape(n, c, h, w)

    for net in (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Bilinear()), Tokens()):
        rf = receptive_field(net, cap=64)
        assert rf.method == "probe" and not rf.clipped
        with pytest.raises(ConfigError, match="cannot follow this network") as info:
            receptive_field(net, method="graph", cap=64)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="method 'exact'"):
        receptive_field(nn.Conv2d(3, 4, 3), method="exact")


def test_graph_rf_errors_are_the_probes():
    """A network that cannot take even the largest input: the same one-line error from both methods."""
    for method in ("graph", "probe"):
        with pytest.raises(ConfigError, match="cannot take a 32x32 probe input") as info:
            receptive_field(nn.Conv2d(3, 4, 40), method=method, cap=32)
        assert "\n" not in str(info.value)


# ---- the squares ----------------------------------------------------------------------------------------------------


def test_erf_fractions_of_hand_made_maps():
    delta = np.zeros((64, 64))
    delta[32, 32] = 5.0
    assert erf_fractions(delta) == {"t20": 1 / 64, "t50": 1 / 64, "t90": 1 / 64, "t99": 1 / 64}
    uniform = erf_fractions(np.ones((64, 64)))
    assert uniform["t50"] == 47 / 64  # sqrt(0.5) * 64 = 45.3 -> the next odd side
    for t in (0.2, 0.5, 0.9, 0.99):
        assert uniform[f"t{round(t * 100)}"] == smallest_odd_side(t, 64) / 64
    # squares are centred on the map's centre of mass (where the centre output looks), not on the input's centre
    off = np.zeros((64, 64))
    off[20, 40] = 1.0
    assert erf_centre(off) == (20, 40) and erf_fractions(off)["t99"] == 1 / 64
    block = np.zeros((64, 64))
    block[10:21, 30:41] = 1.0  # an 11x11 block around (15, 35)
    assert erf_fractions(block, (1.0,)) == {"t100": 11 / 64}
    assert erf_fractions(torch.ones(9, 9), (1.0,)) == {"t100": 1.0}


def test_erf_fractions_refuse_zero_maps_and_bad_thresholds():
    with pytest.raises(DataError, match="all zeros") as info:
        erf_fractions(np.zeros((8, 8)))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="threshold"):
        erf_fractions(np.ones((8, 8)), (0.5, 1.5))
    with pytest.raises(ConfigError, match="2-d"):
        erf_fractions(np.ones(8))


# ---- RapidNet, timm and dense models --------------------------------------------------------------------------------


def test_rapidnet_ti_at_init_on_a_tiny_input():
    torch.manual_seed(0)  # the bound below is on a random model: its draw must not depend on the tests run before
    model = rapidnet.create_model("rapidnet_ti", num_classes=0).eval()
    rows = measure_erf(model, torch.rand(2, 3, 64, 64), [2, 3], name="rapidnet_ti", rf_cap=128)
    assert [(r["stage"], r["reduction"], r["feature_size"]) for r in rows] == [(2, 16, [4, 4]), (3, 32, [2, 2])]
    for r in rows:
        fractions = [r["t20"], r["t50"], r["t90"], r["t99"]]
        assert all(0 < f <= 1 for f in fractions) and fractions == sorted(fractions)
        assert r["map"].shape == (64, 64) and r["images"] == 2 and r["resolution"] == 64
        assert r["theoretical_rf"] == 128 and r["theoretical_rf_clipped"]  # the RF outgrows a 128 probe
    # layer scales of 1e-5: the blocks are muted and stage 2 sees what the stem and the two downsampling convs see,
    # 7 + 2 * 4 + 2 * 8 = 31 pixels (its theoretical RF, blocks included, is 847). 90% lies well inside; the 99%
    # square came out at 31 px for nine random models in ten and at 33 px for one: the muted path still leaks a sliver
    assert rows[0]["t90"] < 31 / 64 and rows[0]["t99"] <= 33 / 64


def test_rapidnet_theoretical_rf_grows_with_each_stage():
    ti = stage_features(rapidnet.create_model("rapidnet_ti", num_classes=0), [0, 1])
    # stem 3x3/2 + 3x3/2 = 7, two depthwise 3x3 at stride 4: 23; a 3x3/2 downsample and two more at stride 8: 63
    assert [theoretical_rf(ti[0]), theoretical_rf(ti[1])] == [23, 63]
    micro = stage_features(rapidnet.create_model("rapidnet_ti", num_classes=0, **MICRO), [2, 3])
    rf2, rf3 = receptive_field(micro[2], cap=512), receptive_field(micro[3], cap=512)
    # stage 2: 39 + 16 (downsample) + 32 (IR) + one DC block (CPE 7x7, MLDC dilation 3, FFN 7x7: 3 * 6 * 16) = 375
    assert (rf2.side, rf2.clipped) == (375, False)
    assert rf3.side > rf2.side and rf3.clipped


def test_timm_model_stage_is_its_stride_not_its_index():
    model = build_model("mobilenetv2_100")[0]  # features at strides 2, 4, 8, 16, 32
    extractor = stage_features(model, [2])[2]
    assert (extractor.reduction, extractor.index) == (16, 3)
    rows = measure_erf(model, torch.rand(1, 3, 64, 64), [2], name="mobilenetv2_100", rf_cap=64)
    assert rows[0]["reduction"] == 16 and rows[0]["feature_size"] == [4, 4]
    assert 0 < rows[0]["t50"] <= rows[0]["t99"] <= 1


def test_timm_feature_list_stops_at_the_stage_with_the_same_output():
    body = build_model("resnet10t")[0]  # a FeatureListNet: strides 2, 4, 8, 16, 32
    x = torch.rand(1, 3, 64, 64)
    extractors = stage_features(body, [0, 1])
    with torch.no_grad():
        full = body(x)
        assert torch.equal(extractors[0](x), full[1]) and torch.equal(extractors[1](x), full[2])


def test_a_missing_stage_names_the_strides_the_model_has():
    with pytest.raises(ConfigError, match=r"no stage 4 \(stride 64\).*4, 8, 16, 32"):
        stage_features(rapidnet.create_model("rapidnet_ti", num_classes=0, **MICRO), [4], "micro")
    with pytest.raises(ConfigError, match="gives no stage outputs"):
        stage_features(nn.Conv2d(3, 3, 3), [0])


def test_dense_model_is_measured_on_its_backbone_body():
    seg = rapidnet.models.semantic_fpn(
        backbone="rapidnet_ti", num_classes=3, fpn_channels=16, head_channels=16, backbone_kwargs=MICRO_BACKBONE
    ).eval()
    x = torch.rand(1, 3, 32, 32)
    extractor = stage_features(seg, [1])[1]
    assert extractor.model is seg.backbone.body
    with torch.no_grad():
        assert torch.equal(extractor(x), seg.backbone.body(x)[1])
    mean, std = model_normalization(seg)
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))


def test_load_images_from_a_folder_and_fashion_mnist(image_folder, fm_root):
    folder = load_images(image_folder, 2, 24)  # sorted: a.png, b.png (grey), then sub/c.png
    assert folder.shape == (2, 3, 24, 24) and folder.dtype == torch.float32
    assert folder.min() >= 0 and folder.max() <= 1
    assert torch.equal(folder[1, 0], folder[1, 2]) and not torch.equal(folder[0, 0], folder[0, 2])
    assert len(load_images(image_folder, 50, 24)) == 3  # all there is
    garments = load_images(fm_root, 3, 32, seed=1)
    assert garments.shape == (3, 3, 32, 32) and torch.equal(garments[:, 0], garments[:, 1])
    assert torch.equal(garments, load_images(fm_root, 3, 32, seed=1))


def test_plot_draws_models_by_stages(tmp_path):
    conv = positive_conv(3, 4, 3)
    rows = [
        {"model": name, "stage": stage, "reduction": 4 * 2**stage, "t50": 0.1, "t90": 0.2, "map": grad}
        for name in ("a", "b")
        for stage in (0, 2)
        for grad in [input_gradient_map(conv, torch.rand(1, 3, 16, 16))]
    ]
    path = plot_erf(rows, tmp_path / "erf.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height  # two rows, two columns and the colour bar
    with pytest.raises(ConfigError, match="does not exist"):
        plot_erf(rows, tmp_path / "missing" / "erf.png")


# ---- the command ----------------------------------------------------------------------------------------------------


def test_cli_json_lines_and_plot(capsys, tmp_path, image_folder):
    png = tmp_path / "out.png"
    code, out, err = run_cli(capsys, "erf", "--model", "rapidnet_ti", "--images", 2, "--resolution", 64, "--stage", 3,
                             "--data", image_folder, "--json", "--plot", png, "--rf-cap", 64)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 1
    r = records[0]
    assert (r["model"], r["checkpoint"], r["stage"], r["reduction"]) == ("rapidnet_ti", None, 3, 32)
    assert (r["resolution"], r["images"], r["theoretical_rf"], r["theoretical_rf_clipped"]) == (64, 2, 64, True)
    assert 0 < r["t20"] <= r["t50"] <= r["t90"] <= r["t99"] <= 1
    assert png.exists() and png.stat().st_size > 1000
    assert "random weights" in err


def test_cli_table_for_two_models(capsys, image_folder):
    code, out, err = run_cli(capsys, "erf", "--model", "rapidnet_ti", "resnet10t", "--images", 3, "--resolution", 32,
                             "--stage", 0, 1, "--data", image_folder, "--rf-cap", 64)  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "checkpoint", "stage", "stride"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("rapidnet_ti", "0", "4"),
        ("rapidnet_ti", "1", "8"),
        ("resnet10t", "0", "4"),
        ("resnet10t", "1", "8"),
    ]
    assert rows[0][-1] == "23" and rows[1][-1] == ">=64"  # 63 needs a 128 probe: clipped at --rf-cap 64


def test_cli_reads_classifier_and_dense_checkpoints(capsys, tmp_path, image_folder):
    import timm
    from safetensors.torch import save_file

    peer = timm.create_model("resnet10t", num_classes=2)
    rapidnet.save_weights(peer, tmp_path / "peer.safetensors")
    seg = rapidnet.models.semantic_fpn(
        backbone="rapidnet_ti", num_classes=3, fpn_channels=16, head_channels=16, backbone_kwargs=MICRO_BACKBONE,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25),
    )  # fmt: skip
    meta = {
        "format": "rapidnet-segmentation",
        "task": "segmentation",
        "build_args": json.dumps(seg.build_args),
        "class_names": json.dumps(["a", "b", "c"]),
        "eval_args": json.dumps({"num_classes": 3}),
    }
    save_file({k: v.contiguous() for k, v in seg.state_dict().items()}, str(tmp_path / "seg.safetensors"), meta)
    model, stored = build_model(None, tmp_path / "seg.safetensors")
    assert model_normalization(model, stored) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    code, out, err = run_cli(capsys, "erf", "--checkpoint", tmp_path / "peer.safetensors", tmp_path / "seg.safetensors",
                             "--images", 1, "--resolution", 32, "--stage", 1, "--data", image_folder, "--json",
                             "--rf-cap", 32)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["model"], r["reduction"]) for r in records] == [("resnet10t", 8), ("rapidnet_ti", 8)]
    assert records[1]["checkpoint"] == str(tmp_path / "seg.safetensors")
    code, _, err = run_cli(capsys, "erf", "--model", "rapidnet_s", "--checkpoint", tmp_path / "seg.safetensors",
                           "--images", 1, "--resolution", 32, "--stage", 1, "--data", image_folder)  # fmt: skip
    assert code == 2 and "on rapidnet_ti, not rapidnet_s" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "rapidnet_xl"], "unknown model 'rapidnet_xl'"),
        (["--model", "efficientvit_m0", "--stage", "0"], "no stage 0 (stride 4): its feature strides are 16, 32, 64"),
        (["--data", "EMPTY"], "no images in"),
        (["--model", "rapidnet_ti", "--checkpoint", "a.pt", "b.pt"], "2 checkpoints for 1 --model"),
        (["--images", "0"], "--images 0"),
        (["--resolution", "16", "--stage", "3"], "too small for stage 3 (stride 32)"),
        (["--plot", "MISSING/erf.png"], "does not exist"),
        (["--model", "resnet10t", "--mldc-dilations", "1", "1"], "--mldc-dilations applies"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path, image_folder, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("EMPTY", str(tmp_path / "empty")).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    defaults = ["--images", "1", "--resolution", "32", "--stage", "1", "--data", str(image_folder)]
    code, _, err = run_cli(capsys, "erf", *defaults, *argv)
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _mldc_supported() -> bool:
    """Whether RapidNet takes ``mldc_dilations`` yet (the argument is new: before it, a TypeError, or the factory's
    one-line error for an argument RapidNet does not have)."""
    try:
        rapidnet.create_model("rapidnet_ti", mldc_dilations=(1, 1))
    except (TypeError, ConfigError):
        return False
    return True


def test_mldc_dilations_reach_the_rapidnet_built_by_name(capsys, image_folder):
    if not _mldc_supported():
        pytest.skip("RapidNet does not take mldc_dilations yet")
    code, out, err = run_cli(capsys, "erf", "--model", "rapidnet_ti", "resnet10t", "--mldc-dilations", 1, 1,
                             "--images", 1, "--resolution", 32, "--stage", 1, "--data", image_folder, "--json",
                             "--rf-cap", 32)  # fmt: skip
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["mldc_dilations"] for r in records] == [[1, 1], None]  # the RapidNet only
    # two dilation-1 branches instead of 2 and 3: the DC block of stage 2 grows the RF by 2 * 16 there, not 6 * 16
    micro = build_model("rapidnet_ti", mldc_dilations=(1, 1))[0]
    assert micro.pretrained_cfg["architecture"] == "rapidnet_ti"
    micro = rapidnet.create_model("rapidnet_ti", num_classes=0, mldc_dilations=(1, 1), **MICRO)
    assert theoretical_rf(stage_features(micro, [2])[2], cap=512) == 375 - 64


def spy_threads(monkeypatch) -> list[int]:
    """The torch thread count at each ``measure_erf`` call the command makes."""
    from rapidnet.analysis import erf

    seen: list[int] = []
    measure = erf.measure_erf

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return measure(*args, **kwargs)

    monkeypatch.setattr(erf, "measure_erf", spy)
    return seen


def test_cli_threads_flag_is_used_and_the_count_restored(capsys, monkeypatch, image_folder):
    seen = spy_threads(monkeypatch)
    code, _, err = run_cli(capsys, "erf", "--images", 1, "--resolution", 32, "--stage", 0, "--data", image_folder,
                           "--threads", 2, "--json")  # fmt: skip
    assert code == 0, err
    assert seen == [2] and torch.get_num_threads() == 1


def test_cli_measures_on_the_cores_other_processes_leave_free(capsys, monkeypatch, image_folder):
    """As training does (engine/cpu_share): another process keeping 1.5 of 2 cores busy leaves one thread."""
    import rapidnet.engine.cpu_share as cpu_share

    class Busy:
        def __init__(self, max_threads: int, now: float, interval_s: float) -> None:
            self.threads, self.others = max_threads, 0.0

        def poll(self, now: float) -> int:
            self.threads, self.others = 1, 1.5
            return 1

    monkeypatch.setattr(cpu_share, "ThreadGovernor", Busy)
    seen = spy_threads(monkeypatch)
    torch.set_num_threads(2)
    code, _, err = run_cli(capsys, "erf", "--images", 1, "--resolution", 32, "--stage", 0, "--data", image_folder,
                           "--json")  # fmt: skip
    assert code == 0, err
    assert seen == [1] and torch.get_num_threads() == 2
    assert "other processes are using 1.5 cores: measuring on 1 of 2 threads" in err
