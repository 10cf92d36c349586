"""Checkpoints: every wrapper of the authors' format, ours, and one-line errors for the bad ones."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import timm
import torch

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.errors import CheckpointError
from rapidnet.models.checkpoint import infer_arch, load_timm_weights, model_metadata, read_checkpoint_file
from rapidnet.models.key_names import convert_official
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
    broken = {k: v for k, v in sd.items() if "ffn.fc2." not in k}
    broken["stages.0.blocks.0.surprise"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing \d+ .*ffn\.fc2.*unexpected 1 .*surprise"):
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


# ---- rapidnet.load: one entry for every file ------------------------------------------------------------------------


def _meta(names: list[str], size: int = 32) -> dict[str, str]:
    """The class names and eval transform this project stores with weights."""
    return {"class_names": json.dumps(names), "pretrained_cfg": json.dumps({"input_size": [3, size, size]})}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_load_authors_file_reads_architecture_and_returns_eval_model(micro_checkpoint, micro_expected):
    model, meta = rapidnet.load(micro_checkpoint)
    assert isinstance(model, rapidnet.RapidNet) and not model.training
    assert meta == {"format": "rapidnet", "arch": "custom"}
    assert model.pretrained_cfg["file"] == str(micro_checkpoint) and "state_dict" not in model.pretrained_cfg
    assert _close(logits_of(model, micro_expected), micro_expected["logits"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_own_format_decodes_metadata_and_merges_the_eval_transform(tmp_path, micro_model, suffix):
    path = rapidnet.save_weights(micro_model, tmp_path / f"m{suffix}", _meta([f"c{i}" for i in range(10)], 48))
    model, meta = rapidnet.load(path)
    assert meta["class_names"] == [f"c{i}" for i in range(10)]
    assert meta["pretrained_cfg"] == {"input_size": [3, 48, 48]}
    assert (meta["format"], meta["num_classes"], meta["distillation"]) == ("rapidnet", 10, True)
    assert meta["depths"] == [list(d) for d in MICRO["depths"]]
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)  # stored transform over the variant's
    assert model.pretrained_cfg["crop_pct"] == 0.9  # the rest stays the variant's
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert _close(model(x), micro_model(x))


def test_load_training_state_ema_first_raw_on_request(tmp_path, micro_model):
    from rapidnet.engine.checkpoint import save_training_state

    raw = {k: v.clone() for k, v in micro_model.state_dict().items()}
    ema = scaled(raw, 0.5)
    meta = {**model_metadata(micro_model), **_meta([str(i) for i in range(10)])}
    path = save_training_state(tmp_path / "last.pt", {"model": raw, "model_ema": ema, "rapidnet": meta, "epoch": 3})
    ema_model, decoded = rapidnet.load(path)
    raw_model, _ = rapidnet.load(path, use_ema=False)
    assert decoded["class_names"] == [str(i) for i in range(10)]
    for key in ("stem.0.conv.weight", "head.fc.weight"):
        assert torch.equal(ema_model.state_dict()[key], ema[key])
        assert torch.equal(raw_model.state_dict()[key], raw[key])


def test_load_fused_file_builds_the_inference_structure(tmp_path, micro_model, monkeypatch):
    """A reparameterized file is built with ``inference_mode=True`` (nothing built to be folded), loads strictly."""
    from rapidnet.models.rapidnet import ConvNormAct

    fused = rapidnet.reparameterize(micro_model)
    path = rapidnet.save_weights(fused, tmp_path / "fused.safetensors")
    monkeypatch.setattr(ConvNormAct, "reparameterize", lambda *_: pytest.fail("nothing may be built to be folded"))
    model, meta = rapidnet.load(path)
    assert meta["reparameterized"] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.head.fc_dist is None and model.stages[2].blocks[-1].mixer.cpe.pe is None
    assert set(model.state_dict()) == set(fused.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _close(model(x), micro_model(x))


def test_load_reads_the_file_once(micro_checkpoint, monkeypatch):
    import rapidnet.models.checkpoint as ck

    calls = []
    real = ck.read_checkpoint
    monkeypatch.setattr(ck, "read_checkpoint", lambda path: calls.append(path) or real(path))
    rapidnet.load(micro_checkpoint)
    rapidnet.load(micro_checkpoint, features_only=True)
    assert calls == [micro_checkpoint, micro_checkpoint]


def test_every_way_in_reads_converts_and_builds_once(micro_checkpoint, monkeypatch):
    """One read into one record: the weights converted once, the architecture read once, one build through timm."""
    import rapidnet.models.checkpoint as ck
    import rapidnet.models.factory as factory

    calls: list[str] = []

    def counting(name, fn):
        return lambda *args, **kwargs: calls.append(name) or fn(*args, **kwargs)

    for module, name in ((ck, "read_checkpoint"), (ck, "to_own_keys"), (ck, "infer_arch")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    monkeypatch.setattr(factory, "build_model_with_cfg", counting("build", factory.build_model_with_cfg))
    once = ["read_checkpoint", "to_own_keys", "infer_arch", "build"]
    for way in (
        lambda: rapidnet.load(micro_checkpoint),
        lambda: rapidnet.load(micro_checkpoint, features_only=True),
        lambda: rapidnet.create_model("rapidnet_ti", checkpoint=micro_checkpoint, num_classes=10, **MICRO),
        lambda: timm.create_model(
            "rapidnet_ti", pretrained=True, pretrained_cfg_overlay=dict(file=str(micro_checkpoint)), **MICRO
        ),
    ):
        calls.clear()
        way()
        assert sorted(calls) == sorted(once)


def test_models_import_one_way():
    """No module of rapidnet.models imports one that imports it back, not even inside a function."""
    import ast
    from pathlib import Path

    import rapidnet.models

    folder = Path(rapidnet.models.__file__).parent
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rapidnet.models."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("rapidnet.models.")}
        graph[name] = deps - {name}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in graph.get(name, ()):
                visit(dep, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_groups_equal_to_a_stage_width_load_through_every_way_in(tmp_path):
    """The architecture is read once, with the file's recorded mldc_groups: a group count equal to the first Dilated
    Convolution stage's width (depthwise in shape, a count in the file) builds what the file records."""
    arch = dict(MICRO, widths=(16, 24, 32, 64))
    path = rapidnet.save_weights(
        rapidnet.create_model("rapidnet_ti", num_classes=10, mldc_groups=32, **arch), tmp_path / "g.safetensors"
    )
    assert rapidnet.load(path)[0].mldc_groups == 32
    assert rapidnet.create_model("rapidnet_ti", checkpoint=path, num_classes=10, **arch).mldc_groups == 32
    overlay = dict(file=str(path))
    assert timm.create_model("rapidnet_ti", pretrained=True, pretrained_cfg_overlay=overlay, **arch).mldc_groups == 32


def test_load_timm_peer_by_metadata_and_by_name(tmp_path):
    source = randomize_(timm.create_model("resnet10t", num_classes=3)).eval()
    named = rapidnet.save_weights(source, tmp_path / "r.safetensors", _meta(["a", "b", "c"]))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "bare.pth")  # no metadata: needs its name
    x = torch.randn(1, 3, 64, 64)
    model, meta = rapidnet.load(named)
    assert (meta["format"], meta["arch"], meta["num_classes"], meta["class_names"]) == (
        "timm",
        "resnet10t",
        3,
        list("abc"),
    )
    bare, bare_meta = rapidnet.load(tmp_path / "bare.pth", model="resnet10t")
    assert bare_meta == {"format": "timm", "arch": "resnet10t"} and bare.num_classes == 3  # classifier rows
    with torch.no_grad():
        assert _close(model(x), source(x)) and _close(bare(x), source(x))
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_load_timm_peer_features_only_maps_flattened_keys(tmp_path):
    source = randomize_(timm.create_model("convnext_atto", num_classes=3)).eval()
    body, _ = rapidnet.load(rapidnet.save_weights(source, tmp_path / "c.safetensors"), features_only=True)
    assert type(body).__name__ == "FeatureListNet"  # its keys: 'stages.0' became 'stages_0'
    key = "stages.1.blocks.0.conv_dw.weight"
    assert torch.equal(body.state_dict()[key.replace(".", "_", 1)], source.state_dict()[key])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = source.forward_intermediates(x, indices=4, intermediates_only=True)
        for ours, ref in zip(body(x), theirs, strict=True):
            assert _close(ours, ref)


def test_load_dense_checkpoint_rebuilds_from_build_args(tmp_path):
    from rapidnet.models import semantic_fpn

    seg = semantic_fpn("rapidnet_ti", num_classes=3, class_names=["sky", "road", "car"], backbone_kwargs=MICRO)
    seg = randomize_(seg).eval()
    meta = {
        "format": "rapidnet-segmentation",
        "task": "segmentation",
        "build_args": json.dumps(seg.build_args),
        "class_names": json.dumps(["sky", "road", "car"]),
        "eval_args": json.dumps({"scale": [64, 64]}),
    }
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in seg.state_dict().items()}, str(tmp_path / "seg.safetensors"), meta)
    model, decoded = rapidnet.load(tmp_path / "seg.safetensors")
    assert type(model) is type(seg) and not model.training
    assert decoded["eval_args"] == {"scale": [64, 64]} and decoded["class_names"] == ["sky", "road", "car"]
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert _close(model(image), seg(image))
    with pytest.raises(CheckpointError, match="holds a segmentation model, not detection"):
        rapidnet.load(tmp_path / "seg.safetensors", task="detection")


def test_load_model_name_is_checked_and_unknown_names_fail_before_reading(tmp_path, micro_checkpoint):
    with pytest.raises(CheckpointError, match=r"is a custom RapidNet .*not rapidnet_ti") as err:
        rapidnet.load(micro_checkpoint, model="rapidnet_ti")
    assert "\n" not in str(err.value)
    with pytest.raises(rapidnet.ConfigError, match="unknown model 'no_such_net'"):
        rapidnet.load(tmp_path / "not-even-there.pth", model="no_such_net")
    own = rapidnet.save_weights(rapidnet.create_model("rapidnet_ti", **MICRO), tmp_path / "own.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a rapidnet model \(custom\), not resnet10t"):
        rapidnet.load(own, model="resnet10t")
    with pytest.raises(CheckpointError, match=r"does not fit resnet10t: \d+ of its weights are missing"):
        rapidnet.load(micro_checkpoint, model="resnet10t")  # no metadata: the name says what it holds
    with pytest.raises(CheckpointError, match="holds a classification model, not segmentation"):
        rapidnet.load(micro_checkpoint, task="segmentation")


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("class_names", "['cat', 'dog'", "Expecting value"),
        ("pretrained_cfg", "[3, 32, 32]", "expected a dict"),
        ("num_classes", "ten", "invalid literal"),
        ("distillation", "maybe", "expected true or false"),
    ],
)
def test_malformed_metadata_is_one_line_naming_file_and_key(tmp_path, micro_model, key, value, why):
    path = rapidnet.save_weights(micro_model, tmp_path / "bad.safetensors", {key: value})
    with pytest.raises(CheckpointError, match=rf"bad.safetensors has unreadable '{key}' metadata \(.*{why}") as err:
        rapidnet.load(path)
    assert "\n" not in str(err.value) and "re-export" in str(err.value)


def test_timm_classifier_of_another_class_count_is_dropped_for_fine_tuning(tmp_path, caplog):
    source = timm.create_model("resnet10t", num_classes=5)
    torch.save({"model": source.state_dict()}, tmp_path / "five.pth")
    target = timm.create_model("resnet10t", num_classes=3)
    state_dict = read_checkpoint_file(tmp_path / "five.pth").state_dict
    with caplog.at_level(logging.INFO, logger="rapidnet"):
        load_timm_weights(target, state_dict, tmp_path / "five.pth")
    assert torch.equal(target.conv1[0].weight, source.conv1[0].weight) and target.fc.out_features == 3
    assert [r for r in caplog.records if "classifier dropped" in r.message]
    other = timm.create_model("resnet14t", num_classes=3)
    with pytest.raises(CheckpointError, match=r"does not fit resnet14t: .*: pass a checkpoint of resnet14t"):
        load_timm_weights(other, state_dict, tmp_path / "five.pth")
