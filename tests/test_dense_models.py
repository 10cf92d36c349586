"""Dense models: Mask R-CNN and Semantic FPN over RapidNet / timm backbones (training, BN freezing, checkpoints,
reparameterization, backbone GMACs at 512 from SPEC.md)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models.backbone import build_backbone, pad_images, stage_of_parameters
from rapidnet.models.complexity import count_gmacs
from rapidnet.models.detection import mask_rcnn
from rapidnet.models.segmentation import semantic_fpn

# A Mask R-CNN small enough for CPU tests: 64 px images, small anchors, few sampled proposals.
TINY_DET = dict(
    min_size=64,
    max_size=64,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=32,
    backbone_kwargs=MICRO,
)


@pytest.fixture(scope="module")
def micro_checkpoint_file(tmp_path_factory):
    """A RapidNet classification checkpoint (10 classes) with non-trivial BN statistics and layer scales."""
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO), seed=1)
    return rapidnet.save_weights(model, tmp_path_factory.mktemp("ckpt") / "micro.safetensors"), model


def _detection_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Two 64x64 images with bright rectangles where the boxes are, so there is something to learn."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for shift in (0, 6):
        img = torch.rand(3, 64, 64, generator=g) * 0.2
        boxes = torch.tensor([[4.0 + shift, 8, 28 + shift, 30], [30, 34 - shift, 56, 60 - shift]])
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
            img[k, y1:y2, x1:x2] = 0.9
        images.append(img)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "image_id": len(images)})
    return images, targets


def _seeded_loss(model, images, targets) -> float:
    """The training loss with the samplers' randomness fixed, so before/after are comparable."""
    torch.manual_seed(123)
    with torch.no_grad():
        return float(sum(model(images, targets).values()))


def test_mask_rcnn_overfits_one_batch():
    torch.manual_seed(0)
    model = mask_rcnn("rapidnet_ti", num_classes=2, **TINY_DET).train()
    images, targets = _detection_batch()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    before = _seeded_loss(model, images, targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    for _ in range(8):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _seeded_loss(model, images, targets)
    assert after < 0.5 * before, (before, after)

    model.eval()
    preds = model(images, targets)  # eval ignores targets
    assert len(preds) == 2 and {"boxes", "labels", "scores", "masks"} <= set(preds[0])
    assert preds[0]["masks"].shape[1:] == (1, 64, 64)
    assert len(preds[0]["boxes"]) > 0  # trained: something to compare boxes_only() against

    mask_calls: list[int] = []
    model.roi_heads.mask_head.register_forward_hook(lambda *_: mask_calls.append(1))
    with torch.no_grad(), model.boxes_only():
        boxes_only = model(images)
    assert not mask_calls and "masks" not in boxes_only[0]
    for full, fast in zip(preds, boxes_only, strict=True):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(full[key], fast[key]), key
    with torch.no_grad():
        assert "masks" in model(images)[0] and mask_calls  # the block restores the mask head


def _segmentation_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Two images whose colour encodes the class of each region (3 classes, some ignored pixels)."""
    g = torch.Generator().manual_seed(0)
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.3, 0.9]])
    images, targets = [], []
    for flip in (False, True):
        label = torch.zeros(64, 64, dtype=torch.long)
        label[8:40, 4:30] = 1
        label[30:60, 34:62] = 2
        if flip:
            label = label.flip(-1)
        img = palette[label].permute(2, 0, 1) + torch.rand(3, 64, 64, generator=g) * 0.1
        label[:2] = 255
        images.append(img)
        targets.append({"sem_seg": label})
    return images, targets


def test_semantic_fpn_overfits_one_batch():
    torch.manual_seed(0)
    model = semantic_fpn("rapidnet_ti", num_classes=3, backbone_kwargs=MICRO).train()
    images, targets = _segmentation_batch()
    before = model(images, targets)["loss_seg"].item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(12):
        loss = model(images, targets)["loss_seg"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    logits = model(images)
    assert logits.shape == (2, 3, 64, 64)
    model.train()
    after = model(images, targets)["loss_seg"].item()
    assert after < 0.5 * before, (before, after)


def test_semantic_fpn_pads_mixed_sizes_and_ignores_padding():
    model = semantic_fpn("rapidnet_ti", num_classes=3, backbone_kwargs=MICRO, dropout=0.0)
    images = [torch.rand(3, 40, 52), torch.rand(3, 64, 30)]
    targets = [{"sem_seg": torch.randint(0, 3, im.shape[-2:])} for im in images]
    loss = model.train()(images, targets)["loss_seg"]
    assert torch.isfinite(loss)
    logits = model.eval()(images)
    assert logits.shape == (2, 3, 64, 64)  # padded to a multiple of 32
    assert model(images[:1]).shape == (1, 3, 64, 64)  # 40x52 alone pads to 64x64 as well
    batch, sizes = pad_images(images, 32)
    assert sizes == [(40, 52), (64, 30)] and batch[0, :, 40:].abs().sum() == 0
    all_ignored = [{"sem_seg": torch.full(im.shape[-2:], 255)} for im in images]
    assert model.train()(images, all_ignored)["loss_seg"].item() == 0.0


@pytest.mark.parametrize(("variant", "spec"), [("rapidnet_m", 8.34), ("rapidnet_b", 17.52)])
def test_backbone_gmacs_at_512_match_spec(variant, spec):
    backbone = rapidnet.create_model(variant, features_only=True)
    assert count_gmacs(backbone, 512) == pytest.approx(spec, rel=0.005)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]


def test_detector_reparameterization_keeps_fpn_features(micro_checkpoint_file):
    path, _ = micro_checkpoint_file
    model = mask_rcnn("rapidnet_ti", num_classes=3, backbone_checkpoint=path, **TINY_DET).eval()
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model.backbone(x)
        fused = rapidnet.reparameterize(model)
        after = fused.backbone(x)
    assert list(before) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in before.values()] == [16, 8, 4, 2, 1]
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)
    norms = (torch.nn.BatchNorm2d, FrozenBatchNorm2d)
    assert not any(isinstance(m, norms) for m in fused.backbone.body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())  # original untouched
    with torch.no_grad():
        assert len(fused([x[0]])) == 1  # the fused detector still runs end to end


def test_segmenter_reparameterization_keeps_logits(micro_checkpoint_file):
    path, _ = micro_checkpoint_file
    model = semantic_fpn("rapidnet_ti", num_classes=4, backbone_checkpoint=path, backbone_kwargs=MICRO).eval()
    x = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        before = model(x)
        after = rapidnet.reparameterize(model)(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_backbone_checkpoint_loads_into_detector(micro_checkpoint_file):
    path, source = micro_checkpoint_file
    model = mask_rcnn("rapidnet_ti", num_classes=3, backbone_checkpoint=path, frozen_bn=False, **TINY_DET)
    body = model.backbone.body.state_dict()
    ref = source.state_dict()
    torch.testing.assert_close(body["stem_0.conv.weight"], ref["stem.0.conv.weight"])
    torch.testing.assert_close(
        body["stages_3.blocks.1.mixer.branches.1.bn.running_var"],
        ref["stages.3.blocks.1.mixer.branches.1.bn.running_var"],
    )
    other = rapidnet.save_weights(
        rapidnet.create_model(
            "rapidnet_ti", num_classes=10, depths=((1, 0),) * 4, widths=(16, 24, 32, 48), head_dim=64
        ),
        path.with_name("other.safetensors"),
    )
    with pytest.raises(CheckpointError):
        mask_rcnn("rapidnet_ti", num_classes=3, backbone_checkpoint=other, **TINY_DET)


def test_bn_modes_and_trainable_stages():
    det = mask_rcnn("rapidnet_ti", num_classes=2, **TINY_DET)  # default: FrozenBatchNorm2d
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.backbone.body.modules())

    seg = semantic_fpn("rapidnet_ti", num_classes=3, frozen_bn="eval", trainable_stages=2, backbone_kwargs=MICRO)
    seg.train()
    bns = [m for m in seg.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and seg.head.training
    stats = bns[0].running_mean.clone()
    images, targets = _segmentation_batch()
    seg(images, targets)
    torch.testing.assert_close(bns[0].running_mean, stats)  # statistics stay frozen in training

    units = stage_of_parameters(seg.backbone.body)
    assert sorted(set(units.values())) == [0, 1, 2, 3, 4]
    for name, p in seg.backbone.body.named_parameters():
        assert p.requires_grad == (units[name] >= 3), name
    assert all(p.requires_grad for p in seg.backbone.fpn.parameters())

    trained = semantic_fpn("rapidnet_ti", num_classes=3, frozen_bn=False, backbone_kwargs=MICRO).train()
    assert all(m.training for m in trained.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_timm_backbone_and_its_checkpoint(tmp_path):
    _, channels, _ = build_backbone("mobilenetv2_140")
    assert channels == [32, 48, 136, 448]
    source = timm.create_model("mobilenetv2_050", num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "mnv2.pth")
    model = semantic_fpn(
        "mobilenetv2_050", num_classes=3, backbone_checkpoint=tmp_path / "mnv2.pth", trainable_stages=0
    ).eval()
    torch.testing.assert_close(model.backbone.body.state_dict()["conv_stem.weight"], source.conv_stem.weight)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    with torch.no_grad():
        assert model([torch.rand(3, 64, 64)]).shape == (1, 3, 64, 64)
    torch.save({"model": timm.create_model("resnet18").state_dict()}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="does not fit backbone mobilenetv2_050"):
        semantic_fpn("mobilenetv2_050", num_classes=3, backbone_checkpoint=tmp_path / "resnet.pth")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(backbone="no_such_net"),
        dict(trainable_stages=6),
        dict(frozen_bn="sometimes"),
        dict(num_classes=0),
        dict(anchor_sizes=(8, 16)),
        dict(roi_canonical_scale=0),
        dict(test_size=0),
        dict(test_size=True),
        dict(mask_head_channels=0),
    ],
)
def test_bad_model_options_are_config_errors(kwargs):
    args = dict(TINY_DET, backbone="rapidnet_ti", num_classes=2)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        mask_rcnn(**args)
    assert "\n" not in str(info.value)


def test_build_args_rebuild_the_same_network():
    det = mask_rcnn("rapidnet_ti", num_classes=2, class_names=["a", "b"], **TINY_DET)
    args = json.loads(json.dumps(det.build_args))  # what a checkpoint's metadata would hold
    again = mask_rcnn(**args)
    again.load_state_dict(det.state_dict())  # strict: the same architecture
    assert again.class_names == ["a", "b"] and again.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert again.rpn.anchor_generator.sizes == det.rpn.anchor_generator.sizes
    narrow = mask_rcnn("rapidnet_ti", num_classes=2, mask_head_channels=64, **TINY_DET)
    assert [m.out_channels for m in narrow.roi_heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d)] == [64] * 4
    assert narrow.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3  # 2 classes + background
    mask_rcnn(**json.loads(json.dumps(narrow.build_args))).load_state_dict(narrow.state_dict())

    seg = semantic_fpn("rapidnet_ti", num_classes=3, head_norm="bn", backbone_kwargs=MICRO, image_mean=(0.5,) * 3)
    rebuilt = semantic_fpn(**json.loads(json.dumps(seg.build_args)))
    rebuilt.load_state_dict(seg.state_dict())
    assert rebuilt.image_mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_test_size_resizes_evaluation_only_and_maps_predictions_back():
    """``test_size`` enlarges evaluation images (the longer side's cap with them) and leaves training's resize alone;
    predictions come back in the input's coordinates; checkpoints rebuild it."""
    torch.manual_seed(0)
    model = mask_rcnn("rapidnet_ti", num_classes=2, test_size=96, **TINY_DET)
    images, targets = _detection_batch()
    seen: list[tuple[int, ...]] = []
    model.backbone.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    model.train()(images, targets)
    model.eval()
    with torch.no_grad():
        pred = model(images)
        model.transform.test_size = None  # torchvision's own: the last min_size
        model(images)
    assert seen == [(64, 64), (96, 96), (64, 64)]
    for p in pred:
        assert p["masks"].shape[-2:] == (64, 64)
        assert len(p["boxes"]) == 0 or float(p["boxes"].max()) <= 64
    rebuilt = mask_rcnn(**json.loads(json.dumps(model.build_args)))
    assert rebuilt.transform.test_size == 96
    tall = torch.rand(3, 64, 32)  # longer side capped at 64 x 96/64: the shorter one reaches 48, not 96
    rebuilt.eval()
    assert rebuilt.transform([tall])[0].image_sizes == [(96, 48)]


def _roi_levels(model, boxes: torch.Tensor) -> list[int]:
    """The FPN level (2 = P2 .. 5 = P5) the box RoI pooler reads each box from, on a 64x64 input."""
    pool = model.roi_heads.box_roi_pool
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    pool(feats, [boxes], [(64, 64)])  # sets up the level mapper from the feature sizes
    return (pool.map_levels([boxes]) + 2).tolist()


def test_roi_canonical_scale_sends_pretraining_sized_boxes_to_p4():
    boxes = torch.tensor([[0.0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 64, 64]])
    default = mask_rcnn("rapidnet_ti", num_classes=2, **TINY_DET).eval()
    assert _roi_levels(default, boxes) == [2, 2, 2]  # 224 px to P4: every small box lands on P2
    model = mask_rcnn("rapidnet_ti", num_classes=2, roi_canonical_scale=32, **TINY_DET).eval()
    assert _roi_levels(model, boxes) == [3, 4, 5]
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.roi_heads.mask_roi_pool.canonical_scale == 32
    rebuilt = mask_rcnn(**json.loads(json.dumps(model.build_args)))
    assert rebuilt.roi_heads.box_roi_pool.canonical_scale == 32
    rebuilt.load_state_dict(model.state_dict())
    images, _ = _detection_batch()
    with torch.no_grad():
        assert len(model(images)) == 2
