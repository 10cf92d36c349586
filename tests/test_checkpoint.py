"""Checkpoints: every wrapper of the authors' format, ours, and one-line errors for the bad ones."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import timm
import torch

import rapidnet
from conftest import MICRO
from rapidnet.errors import CheckpointError
from rapidnet.models.checkpoint import convert_official, infer_arch
from rapidnet.utils import read_checkpoint


@pytest.fixture(scope="module")
def official_sd(micro_checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(micro_checkpoint, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference_logits(micro_checkpoint, micro_expected) -> torch.Tensor:
    return micro_expected["logits"]


def logits_of(model, micro_expected) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(micro_expected["input"])


def scaled(sd: dict, factor: float) -> dict:
    """Same keys, different weights: to tell EMA from raw weights apart."""
    return {k: v * factor if v.is_floating_point() and "running_var" not in k else v for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"model": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["bare", "model", "state_dict", "ddp-prefix", "model+ddp"],
)
def test_authors_wrappers_load_exactly(tmp_path, official_sd, micro_expected, wrap):
    path = tmp_path / "ck.pth"
    torch.save(wrap(official_sd), path)
    model = rapidnet.create_model("rapidnet_ti", checkpoint=path, num_classes=10, **MICRO)
    assert torch.allclose(logits_of(model, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)


def test_full_training_checkpoint_prefers_ema_with_option_for_raw(tmp_path, official_sd, micro_expected):
    """The authors' train script: state_dict, state_dict_ema, optimizer, ..., args as an argparse.Namespace."""
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "state_dict": scaled(official_sd, 0.5),
            "state_dict_ema": official_sd,
            "optimizer": {"state": {}},
            "lr_scheduler": {},
            "epoch": 299,
            "scaler": {},
            "args": argparse.Namespace(model="rapidnet_ti", lr=2e-3),
        },
        path,
    )
    ema = rapidnet.create_model("rapidnet_ti", checkpoint=path, num_classes=10, **MICRO)
    assert torch.allclose(logits_of(ema, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)
    raw = rapidnet.create_model("rapidnet_ti", checkpoint=path, num_classes=10, use_ema=False, **MICRO)
    assert not torch.allclose(logits_of(raw, micro_expected), micro_expected["logits"], atol=1e-3)


def test_authors_reparameterized_cpe_form(tmp_path, official_sd, micro_expected):
    sd = {}
    for k, v in official_sd.items():
        if "cpe.pe." in k:
            v = v.clone()
            if k.endswith("weight"):
                v[:, 0, 3, 3] += 1.0  # the identity folded into the kernel centre
            k = k.replace("cpe.pe.", "cpe.reparam_conv.")
        sd[k] = v
    path = tmp_path / "reparam.pth"
    torch.save({"model": sd}, path)
    model = rapidnet.load_model(path)
    assert torch.allclose(logits_of(model, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)


def test_pretrained_cfg_overlay_file_through_timm(micro_checkpoint, micro_expected):
    model = timm.create_model(
        "rapidnet_ti", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(micro_checkpoint)), **MICRO
    )
    assert torch.allclose(logits_of(model, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("fused", [False, True])
def test_own_format_round_trip(tmp_path, micro_checkpoint, micro_expected, suffix, fused):
    model = rapidnet.load_model(micro_checkpoint).eval()
    if fused:
        model = rapidnet.reparameterize(model)
    path = rapidnet.save_weights(model, tmp_path / f"own{suffix}")
    assert not list(tmp_path.glob(".*tmp*")), "atomic write leaves no temp file"
    assert path.stat().st_mode & 0o044, "readable by group/others like any other file (umask permitting)"
    again = rapidnet.load_model(path)
    assert infer_arch(again.state_dict()).reparameterized == fused
    assert torch.allclose(logits_of(again, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)


def test_other_class_count_drops_classifier_with_one_log_line(micro_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="rapidnet"):
        model = rapidnet.create_model("rapidnet_ti", checkpoint=micro_checkpoint, num_classes=3, **MICRO)
    assert model.head.fc.out_features == 3
    assert [r.message for r in caplog.records if "classifier dropped" in r.message]
    official = torch.load(micro_checkpoint, weights_only=True)["model"]
    assert torch.equal(model.stem[0].conv.weight, official["stem.stem.0.weight"])  # backbone still loaded


def test_distilled_checkpoint_into_single_head_keeps_eval_logits(micro_checkpoint, micro_expected):
    model = rapidnet.create_model(
        "rapidnet_ti", checkpoint=micro_checkpoint, num_classes=10, distillation=False, **MICRO
    )
    assert model.head.fc_dist is None
    assert torch.allclose(logits_of(model, micro_expected), micro_expected["logits"], atol=1e-4, rtol=1e-4)


def test_wrong_variant_names_the_one_it_looks_like(tmp_path, micro_checkpoint):
    ti = rapidnet.create_model("rapidnet_ti")
    rapidnet.save_weights(ti, tmp_path / "ti.safetensors")
    with pytest.raises(CheckpointError, match=r"is rapidnet_ti .*not rapidnet_s.*create 'rapidnet_ti'") as err:
        rapidnet.create_model("rapidnet_s", checkpoint=tmp_path / "ti.safetensors")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="custom RapidNet"):
        rapidnet.create_model("rapidnet_ti", checkpoint=micro_checkpoint, num_classes=10)


def test_missing_truncated_and_foreign_files(tmp_path, micro_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        rapidnet.load_model(tmp_path / "nope.pth")
    data = micro_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        rapidnet.load_model(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        rapidnet.load_model(tmp_path / "empty.pth")
    (tmp_path / "notes.txt").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError):
        rapidnet.load_model(tmp_path / "notes.txt")
    rapidnet.save_weights(rapidnet.create_model("rapidnet_ti", **MICRO), tmp_path / "ok.safetensors")
    blob = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        rapidnet.load_model(tmp_path / "cut.safetensors")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a RapidNet"):
        rapidnet.load_model(tmp_path / "resnet.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refuses"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_missing_and_unexpected_keys_are_listed(tmp_path, official_sd):
    sd = convert_official(official_sd)
    broken = {k: v for k, v in sd.items() if "conv_d3" not in k}
    broken["stages.0.blocks.0.surprise"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing \d+ .*conv_d3.*unexpected 1 .*surprise"):
        rapidnet.create_model("rapidnet_ti", checkpoint=tmp_path / "broken.pth", num_classes=10, **MICRO)


def test_pretrained_offline_says_to_pass_a_checkpoint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"SLDGroup/RapidNet/RapidNet_Ti.pth.*checkpoint=PATH"):
        rapidnet.create_model("rapidnet_ti", pretrained=True)


def test_load_model_features_only(micro_checkpoint, micro_expected):
    backbone = rapidnet.load_model(micro_checkpoint, features_only=True).eval()
    with torch.no_grad():
        feats = backbone(micro_expected["input"])
    for ours, theirs in zip(feats, micro_expected["features"], strict=True):
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
