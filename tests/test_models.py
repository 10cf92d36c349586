"""The network: SPEC.md's figures, timm's model API, input sizes, features and reparameterization."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.models.complexity import count_gmacs, count_params
from rapidnet.models.rapidnet import VARIANTS, RapidNet

# SPEC.md: params with / without the distillation head, conv GMACs at 224, backbone GMACs at 512.
SPEC = {
    "rapidnet_ti": (6_627_840, 6_114_840, 0.617, 3.22),
    "rapidnet_s": (9_213_088, 8_700_088, 0.897, 4.68),
    "rapidnet_m": (17_304_496, 16_791_496, 1.597, 8.34),
    "rapidnet_b": (30_556_496, 29_787_496, 3.354, 17.52),
}


@pytest.mark.parametrize("variant", list(SPEC))
def test_parameter_counts_equal_spec(variant):
    with_dist, without, _, _ = SPEC[variant]
    assert count_params(rapidnet.create_model(variant)) == with_dist
    assert count_params(rapidnet.create_model(variant, distillation=False)) == without


@pytest.mark.parametrize("variant", list(SPEC))
def test_gmacs_within_half_percent_of_spec(variant):
    _, _, gmacs, _ = SPEC[variant]
    assert count_gmacs(rapidnet.create_model(variant), 224) == pytest.approx(gmacs, rel=0.005)


@pytest.mark.parametrize("variant", ["rapidnet_ti", "rapidnet_b"])
def test_backbone_gmacs_at_512_within_half_percent(variant):
    backbone = rapidnet.create_model(variant, features_only=True)
    assert count_gmacs(backbone, 512) == pytest.approx(SPEC[variant][3], rel=0.005)


@pytest.mark.parametrize("hw", [(32, 32), (33, 47), (64, 96), (225, 225)])
def test_any_input_size_from_32(micro_model, hw):
    x = torch.randn(2, 3, *hw)
    feats = micro_model.forward_intermediates(x, intermediates_only=True)
    expect = hw
    for f, width in zip(feats, MICRO["widths"], strict=True):
        expect = (
            tuple((s + 1) // 2 for s in ((expect[0] + 1) // 2, (expect[1] + 1) // 2))
            if f is feats[0]
            else tuple((s + 1) // 2 for s in expect)
        )
        assert f.shape == (2, width, *expect)
    assert micro_model(x).shape == (2, 10)


def test_train_mode_returns_both_heads_eval_their_mean(micro_model):
    x = torch.randn(2, 3, 64, 64)
    micro_model.train()
    cls, dist = micro_model(x)
    micro_model.eval()
    # BN in train mode uses batch statistics: compare heads in eval on the same pre-logits instead
    pre = micro_model.forward_head(micro_model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, MICRO["head_dim"])
    mean = (micro_model.head.fc(pre) + micro_model.head.fc_dist(pre)) / 2
    assert torch.allclose(micro_model(x), mean, atol=1e-6)
    assert cls.shape == dist.shape == (2, 10)
    micro_model.train()
    micro_model.set_distilled_training(False)
    assert micro_model(x).shape == (2, 10)


def test_single_head_without_distillation():
    model = rapidnet.create_model("rapidnet_ti", distillation=False, num_classes=7, **MICRO).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    assert model.head.fc_dist is None and not model.distillation


def test_timm_registry_and_pretrained_cfg():
    assert set(timm.list_models("rapidnet_*")) >= set(SPEC)
    model = timm.create_model("rapidnet_ti")
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["classifier"] == ("head.fc", "head.fc_dist")
    assert cfg["hf_hub_id"] == "SLDGroup/RapidNet" and cfg["hf_hub_filename"] == "RapidNet_Ti.pth"
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["crop_pct"] == 0.9 and data_cfg["interpolation"] == "bicubic"


def test_timm_api_head_and_classifier(micro_model):
    x = torch.randn(1, 3, 64, 64)
    feats = micro_model.forward_features(x)
    assert feats.shape == (1, MICRO["widths"][-1], 2, 2)
    assert micro_model.forward_head(feats, pre_logits=True).shape == (1, MICRO["head_dim"])
    assert micro_model.get_classifier().out_features == 10
    micro_model.reset_classifier(5)
    assert micro_model(x).shape == (1, 5) and micro_model.num_classes == 5
    micro_model.reset_classifier(0)
    assert micro_model(x).shape == (1, MICRO["head_dim"])


def test_grad_checkpointing_same_outputs_and_gradients(micro_model):
    x = torch.randn(2, 3, 64, 64)
    micro_model.train()
    micro_model.set_distilled_training(False)
    torch.manual_seed(0)
    micro_model(x).sum().backward()
    grads = [p.grad.clone() for p in micro_model.parameters()]
    micro_model.zero_grad()
    micro_model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    micro_model(x).sum().backward()
    for g, p in zip(grads, micro_model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_features_only_and_forward_intermediates_agree(micro_model, tmp_path):
    rapidnet.save_weights(micro_model, tmp_path / "micro.safetensors")
    backbone = rapidnet.create_model(
        "rapidnet_ti", features_only=True, out_indices=(1, 3), checkpoint=tmp_path / "micro.safetensors", **MICRO
    ).eval()
    assert backbone.feature_info.channels() == [24, 48] and backbone.feature_info.reduction() == [8, 32]
    x = torch.randn(1, 3, 70, 90)
    ours = backbone(x)
    ref = micro_model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_stochastic_depth_rises_linearly_over_all_blocks():
    model = rapidnet.create_model("rapidnet_ti", drop_path_rate=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert len(rates) == 16
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in itertools.pairwise(rates))


def test_init_is_kaiming_with_zero_bias():
    model = rapidnet.create_model("rapidnet_ti", **MICRO)
    conv = model.stages[2].blocks[1].mixer.branches[0].conv
    assert torch.count_nonzero(conv.bias) == 0
    expected_std = (2.0 / (conv.in_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.15)
    assert model.stages[0].blocks[0].layer_scale.gamma.eq(1e-5).all()


def test_reparameterize_folds_everything_and_keeps_outputs(micro_model):
    fused = rapidnet.reparameterize(micro_model)
    names = {type(m).__name__ for m in fused.modules()}
    assert "BatchNorm2d" not in names and "LayerScale2d" not in names
    assert fused.head.fc_dist is None
    assert count_params(fused) < count_params(micro_model)
    assert any(type(m).__name__ == "BatchNorm2d" for m in micro_model.modules()), "original must stay trainable"
    for hw in [(32, 32), (64, 96), (45, 77)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            assert torch.allclose(micro_model(x), fused(x), rtol=1e-4, atol=1e-4)


def test_reparameterize_features_only_and_timm_helper(micro_model):
    backbone = randomize_(rapidnet.create_model("rapidnet_ti", features_only=True, **MICRO)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        after = rapidnet.reparameterize(backbone)(x)
        timm_fused = timm.utils.reparameterize_model(micro_model)(x)  # timm's helper finds our reparameterize()
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert timm_fused.shape == (1, 10)


def test_reparameterized_gmacs_not_more():
    model = rapidnet.create_model("rapidnet_ti")
    fused = rapidnet.reparameterize(model)
    assert count_gmacs(fused) <= count_gmacs(model)
    assert count_gmacs(fused) > 0.99 * count_gmacs(model), "the FLOP counter must still see the fused convs"


def test_reparameterize_gives_the_plain_folded_graph(micro_model):
    """No CPU-specific modules or layouts: ordinary padded convs, contiguous weights, nn.GELU; no oneDNN calls."""
    fused = rapidnet.reparameterize(micro_model)
    assert type(fused) is RapidNet
    assert all(p.is_contiguous() for p in fused.parameters())
    dilated = fused.stages[2].blocks[1].mixer.branches[1].conv
    assert type(dilated) is torch.nn.Conv2d and dilated.padding == (3, 3) and dilated.dilation == (3, 3)
    assert isinstance(fused.stages[2].blocks[1].mixer.branches[1].act, torch.nn.GELU)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fused(torch.randn(1, 3, 64, 64))
    ops = {event.key for event in prof.key_averages()}
    assert "aten::gelu" in ops and not any("mkldnn::" in op for op in ops)


@pytest.mark.parametrize("variant", list(SPEC))
def test_inference_mode_has_the_reparameterized_state_dict(variant):
    """``RapidNet(inference_mode=True)`` builds exactly what ``reparameterize`` makes of a training model."""
    built = RapidNet(**VARIANTS[variant], inference_mode=True).state_dict()
    folded = rapidnet.reparameterize(RapidNet(**VARIANTS[variant])).state_dict()
    assert list(built) == list(folded)
    assert all(built[k].shape == v.shape for k, v in folded.items())
    assert not any(k.endswith(("running_var", "gamma")) or ".cpe.pe." in k or "fc_dist" in k for k in built)


def test_fused_weights_load_strictly_into_inference_mode(micro_model):
    fused = rapidnet.reparameterize(micro_model)
    direct = RapidNet(**MICRO, num_classes=10, inference_mode=True).eval()
    direct.load_state_dict(fused.state_dict(), strict=True)
    names = {type(m).__name__ for m in direct.modules()}
    assert "BatchNorm2d" not in names and "LayerScale2d" not in names
    assert direct.head.fc_dist is None and direct.stages[2].blocks[1].mixer.cpe.pe is None
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(direct(x), fused(x))
    ti = randomize_(timm.create_model("rapidnet_ti")).eval()
    through_timm = timm.create_model("rapidnet_ti", inference_mode=True).eval()
    fused_ti = rapidnet.reparameterize(ti)
    through_timm.load_state_dict(fused_ti.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(through_timm(x), fused_ti(x))
    backbone = timm.create_model("rapidnet_ti", features_only=True, inference_mode=True, **MICRO)
    folded_backbone = rapidnet.reparameterize(timm.create_model("rapidnet_ti", features_only=True, **MICRO))
    assert backbone.state_dict().keys() == folded_backbone.state_dict().keys()


def test_bad_constructor_arguments():
    with pytest.raises(rapidnet.ConfigError, match="unknown model"):
        rapidnet.create_model("rapidnet_xl")
    with pytest.raises(ValueError, match="equal length"):
        rapidnet.RapidNet(depths=((1, 0),), widths=(16, 32))


def test_reparameterize_folds_frozen_batchnorm(micro_model):
    """A detector freezes BN (torchvision's FrozenBatchNorm2d); folding it must stay exact."""
    from timm.layers import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(micro_model).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(micro_model(x), rapidnet.reparameterize(frozen)(x), rtol=1e-4, atol=1e-4)


def test_public_dense_entry_points():
    from rapidnet.models import mask_rcnn, semantic_fpn

    assert callable(mask_rcnn) and callable(semantic_fpn)


def _drop_rates(module: torch.nn.Module) -> list[float]:
    from timm.layers import DropPath

    return [m.drop_prob for m in module.modules() if isinstance(m, DropPath)]


def test_one_stochastic_depth_default_for_every_entry_point():
    """``rapidnet.create_model``, ``timm.create_model``, the config and the dense builders share one rate (0.1), the
    dense builders pass it to a timm peer backbone too, and an explicit rate reaches every one of them."""
    import timm

    from rapidnet.config import ModelConfig
    from rapidnet.models import mask_rcnn, semantic_fpn
    from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE

    assert ModelConfig().drop_path_rate == DEFAULT_DROP_PATH_RATE == 0.1
    for model in (rapidnet.create_model("rapidnet_ti"), timm.create_model("rapidnet_ti")):
        assert max(_drop_rates(model)) == pytest.approx(DEFAULT_DROP_PATH_RATE)
    assert not _drop_rates(timm.create_model("rapidnet_ti", drop_path_rate=0.0))
    seg = semantic_fpn(backbone="rapidnet_ti", num_classes=3, fpn_channels=16, head_channels=16)
    assert max(_drop_rates(seg.backbone.body)) == pytest.approx(0.1) and seg.build_args["drop_path_rate"] == 0.1
    det = mask_rcnn(backbone="rapidnet_ti", num_classes=2, fpn_channels=16, drop_path_rate=0.2)
    assert max(_drop_rates(det.backbone.body)) == pytest.approx(0.2) and det.build_args["drop_path_rate"] == 0.2
    peer = semantic_fpn(backbone="mobilenetv2_050", num_classes=3, fpn_channels=16, head_channels=16)
    assert 0.09 < max(_drop_rates(peer.backbone.body)) <= 0.1  # timm's rule over its blocks, none kept at 0
    plain = semantic_fpn(backbone="mobilenetv2_050", num_classes=3, fpn_channels=16, head_channels=16, drop_path_rate=0)
    assert not [p for p in _drop_rates(plain.backbone.body) if p > 0]
