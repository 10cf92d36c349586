"""MLDC as a parameter: every ablation setting builds, trains a step, folds, exports, saves and loads as itself."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.config import config_from_dict
from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models.checkpoint import checkpoint_filter_fn, infer_arch, model_arch, save_weights
from rapidnet.models.rapidnet import DEFAULT_MLDC, RapidNet

#: the ablation table of the issue: one config line each
ABLATIONS = {
    "paper (2, 3)": {},
    "single branch (2,)": dict(mldc_dilations=(2,)),
    "no dilation (1, 1)": dict(mldc_dilations=(1, 1)),
    "(2, 2)": dict(mldc_dilations=(2, 2)),
    "(3, 3)": dict(mldc_dilations=(3, 3)),
    "three levels (1, 2, 3)": dict(mldc_dilations=(1, 2, 3)),
    "three levels (2, 3, 4)": dict(mldc_dilations=(2, 3, 4)),
    "depthwise": dict(mldc_groups="depthwise"),
    "groups 4": dict(mldc_groups=4),
    "ffn kernel 3": dict(ffn_kernel=3),
}


def _micro(**kwargs) -> RapidNet:
    return rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO, **kwargs)


def test_the_default_is_the_paper_model():
    model = rapidnet.create_model("rapidnet_ti")
    mixer = model.stages[2].blocks[-1].mixer
    assert [b.conv.dilation for b in mixer.branches] == [(2, 2), (3, 3)]
    assert all(b.conv.groups == 1 and b.conv.kernel_size == (3, 3) for b in mixer.branches)
    assert model.stages[2].blocks[-1].ffn.dw.conv.kernel_size == (7, 7)
    assert model_arch(model).mldc_args == {**DEFAULT_MLDC}


@pytest.mark.parametrize("settings", list(ABLATIONS.values()), ids=list(ABLATIONS))
def test_every_ablation_trains_folds_exports_and_loads_back(settings, tmp_path):
    torch.manual_seed(0)
    model = _micro(**settings)
    mixer = model.stages[3].blocks[-1].mixer
    dilations = settings.get("mldc_dilations", (2, 3))
    assert tuple(b.conv.dilation[0] for b in mixer.branches) == tuple(dilations)
    if settings.get("mldc_groups") == "depthwise":
        assert mixer.branches[0].conv.groups == mixer.branches[0].conv.in_channels
    # a training step moves the MLDC weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = mixer.branches[0].conv.weight.detach().clone()
    model.train()
    logits = model(torch.randn(4, 3, 64, 64))
    loss = F.cross_entropy(logits[0] if isinstance(logits, tuple) else logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(before, mixer.branches[0].conv.weight)
    # folding keeps the outputs
    model = randomize_(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fused = rapidnet.reparameterize(model)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
    # the file records the settings: it loads back as this ablation, training form and folded form alike
    for form, net in (("train", model), ("fused", fused)):
        path = save_weights(net, tmp_path / f"{form}.safetensors")
        loaded, meta = rapidnet.load(path)
        assert meta["mldc_dilations"] == list(dilations)
        assert tuple(loaded.mldc_dilations) == tuple(dilations)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
    # ONNX export reloads with the same outputs
    pytest.importorskip("onnxruntime")
    from rapidnet.deploy import load_runner
    from rapidnet.deploy.onnx import export_onnx

    onnx_path = export_onnx(model, tmp_path / "m.onnx", resolution=(64, 64), batch_size=2)
    out = load_runner(onnx_path, threads=1)(x.numpy())
    torch.testing.assert_close(
        torch.from_numpy(out[0] if isinstance(out, list) else out), expected, rtol=1e-3, atol=1e-4
    )


def test_timm_and_a_config_build_the_ablation():
    model = timm.create_model("rapidnet_ti", num_classes=10, mldc_dilations=[1, 1], **MICRO)
    assert model.mldc_dilations == (1, 1)
    cfg = config_from_dict({"model": {"name": "rapidnet_ti", "kwargs": {"mldc_dilations": [2, 2], "ffn_kernel": 5}}})
    built = rapidnet.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    assert built.mldc_dilations == (2, 2) and built.ffn_kernel == 5


def test_the_timm_file_path_builds_the_ablation_the_file_records(tmp_path):
    path = save_weights(_micro(mldc_dilations=(1, 1)), tmp_path / "a.safetensors")
    model = timm.create_model(
        "rapidnet_ti", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=10, **MICRO
    )
    assert model.mldc_dilations == (1, 1)
    with pytest.raises(ValueError, match="mldc_dilations"):
        timm.create_model(
            "rapidnet_ti",
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=10,
            mldc_dilations=(2, 3),
            **MICRO,
        )


def test_a_file_builds_its_own_ablation_and_refuses_another(tmp_path):
    path = save_weights(_micro(mldc_dilations=(1, 2, 3)), tmp_path / "three.safetensors")
    assert rapidnet.create_model("rapidnet_ti", checkpoint=path, **MICRO).mldc_dilations == (1, 2, 3)
    with pytest.raises(ValueError, match=r"mldc_dilations \(1, 2, 3\), not \(2, 3\)"):
        rapidnet.create_model("rapidnet_ti", checkpoint=path, mldc_dilations=(2, 3), **MICRO)
    state = _micro(mldc_dilations=(1, 2, 3)).state_dict()
    with pytest.raises(CheckpointError, match="3 MLDC branches per block, the model 2"):
        checkpoint_filter_fn(state, _micro())
    with pytest.raises(CheckpointError, match="3 MLDC branches but records no dilations"):
        infer_arch(state)
    with pytest.raises(CheckpointError, match="mldc_groups depthwise, the model 1"):
        checkpoint_filter_fn(_micro(mldc_groups="depthwise").state_dict(), _micro())
    with pytest.raises(CheckpointError, match="ffn_kernel 3, the model 7"):
        checkpoint_filter_fn(_micro(ffn_kernel=3).state_dict(), _micro())


def test_files_from_before_mldc_was_a_parameter_still_load(tmp_path):
    model = randomize_(_micro()).eval()
    legacy = {
        k.replace("mixer.branches.0.", "mixer.conv_d2.").replace("mixer.branches.1.", "mixer.conv_d3."): v
        for k, v in model.state_dict().items()
    }
    assert any("conv_d3" in k for k in legacy)
    torch.save(legacy, tmp_path / "old.pth")
    loaded, _ = rapidnet.load(tmp_path / "old.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mldc_dilations=[]), "mldc_dilations must be a non-empty list"),
        (dict(mldc_dilations=[0, 2]), "mldc_dilations must be a non-empty list of dilations, each 1..64"),
        (dict(mldc_dilations="23"), "mldc_dilations must be a non-empty list"),
        (dict(ffn_kernel=4), "ffn_kernel must be an odd kernel size"),
        (dict(mldc_groups=0), "mldc_groups must be a positive integer or 'depthwise'"),
        (dict(mldc_groups=5), "mldc_groups must be a divisor of the stage widths"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        rapidnet.create_model("rapidnet_ti", **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError) as direct:  # the constructor itself, as timm.create_model reaches it
        RapidNet(**{**MICRO, **kwargs})
    assert "\n" not in str(direct.value)


def test_bad_settings_from_the_command_line_exit_2(capsys, tmp_path):
    from rapidnet.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: rapidnet_ti\n  kwargs: {mldc_dilations: [2, 0]}\ntrain:\n  epochs: 1\n")
    code = main(["train", "--config", str(cfg), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mldc_dilations" in err and len(err.splitlines()) == 1


def test_copies_keep_the_settings():
    model = _micro(mldc_dilations=(1, 2, 3), ffn_kernel=5)
    clone = copy.deepcopy(model)
    assert clone.mldc_dilations == (1, 2, 3) and model_arch(clone).ffn_kernel == 5
    scripted = torch.jit.script(rapidnet.reparameterize(model.eval()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)
