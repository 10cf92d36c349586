"""The golden check: our forward pass equals the authors' (logits and four stage features) to 1e-4."""

from __future__ import annotations

import pytest
import torch

import rapidnet

TOL = dict(rtol=1e-4, atol=1e-4)


def assert_matches(model: torch.nn.Module, x: torch.Tensor, expected: dict) -> None:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_intermediates(x, intermediates_only=True)
    assert torch.allclose(logits, expected["logits"], **TOL), (logits - expected["logits"]).abs().max()
    cropped = expected.get("features_cropped_to_8x8", [False] * 4)
    assert len(features) == len(expected["features"]) == 4
    for ours, theirs, crop in zip(features, expected["features"], cropped, strict=True):
        ours = ours[:, :, :8, :8] if crop else ours
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, **TOL), (ours - theirs).abs().max()


def micro_model_from(checkpoint, expected) -> torch.nn.Module:
    cfg = expected["config"]
    return rapidnet.create_model(
        "rapidnet_ti",
        checkpoint=checkpoint,
        depths=cfg["blocks"],
        widths=cfg["channels"],
        head_dim=cfg["emb_dims"],
        num_classes=cfg["num_classes"],
        distillation=cfg["distillation"],
    )


def test_micro_matches_authors(micro_checkpoint, micro_expected):
    model = micro_model_from(micro_checkpoint, micro_expected)
    assert_matches(model, micro_expected["input"], micro_expected)


def test_micro_matches_authors_after_reparameterize(micro_checkpoint, micro_expected):
    model = rapidnet.reparameterize(micro_model_from(micro_checkpoint, micro_expected))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert_matches(model, micro_expected["input"], micro_expected)


def test_micro_load_model_needs_no_config(micro_checkpoint, micro_expected):
    """``load_model`` reads the architecture off the file itself."""
    model = rapidnet.load_model(micro_checkpoint)
    assert model.widths == tuple(micro_expected["config"]["channels"])
    assert_matches(model, micro_expected["input"], micro_expected)


@pytest.mark.parametrize("fused", [False, True], ids=["as-loaded", "reparameterized"])
def test_rapidnet_ti_seed0_matches_authors(reference_module, tmp_path, fused):
    expected = torch.load(reference_module.HERE / "rapidnet_ti_seed0_expected.pt", weights_only=True)
    path = tmp_path / "ti.pth"
    torch.save({"model": reference_module.make_state_dict("rapidnet_ti", 0)}, path)
    model = rapidnet.create_model("rapidnet_ti", checkpoint=path)
    if fused:
        model = rapidnet.reparameterize(model)
    x = reference_module.make_input(0, tuple(expected["input_shape"]))
    assert_matches(model, x, expected)
    for name in ("logits_head", "logits_dist"):
        assert name in expected
    head = model.eval().head if not fused else None
    if head is not None:  # the two heads separately, before they are merged by reparameterization
        with torch.no_grad():
            pre = model.forward_head(model.forward_features(x), pre_logits=True)
            assert torch.allclose(head.fc(pre), expected["logits_head"], **TOL)
            assert torch.allclose(head.fc_dist(pre), expected["logits_dist"], **TOL)


@pytest.mark.parametrize("variant", ["rapidnet_s", "rapidnet_m", "rapidnet_b"])
def test_every_variant_loads_authors_key_table(reference_module, tmp_path, variant):
    """Each variant's official key table converts and loads strictly, and reparameterizes to the same outputs."""
    path = tmp_path / f"{variant}.pth"
    torch.save({"model": reference_module.make_state_dict(variant, 1)}, path)
    model = rapidnet.create_model(variant, checkpoint=path).eval()
    x = reference_module.make_input(1, (1, 3, 97, 131))  # odd size: not a multiple of 32
    with torch.no_grad():
        out, fused_out = model(x), rapidnet.reparameterize(model)(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert torch.allclose(out, fused_out, **TOL)
