"""Export (issue 4, item 1): ONNX / TorchScript / Core ML of the fused model match PyTorch; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rapidnet
from conftest import MICRO, randomize_, run_cli
from rapidnet.deploy import export, read_metadata, verify_file
from rapidnet.deploy.coreml import coreml_spec_problems
from rapidnet.deploy.onnx import export_onnx, ort_session, run_ort

TOL = 1e-4


def _micro(features_only: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = rapidnet.create_model("rapidnet_ti", num_classes=10, features_only=features_only, **MICRO)
    return randomize_(model, seed).eval()


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


def _close(ours: list[np.ndarray], ref: list[np.ndarray]) -> bool:
    """The project's tolerance: allclose(rtol=1e-4, atol=1e-4) on every output, with equal shapes."""
    assert [a.shape for a in ours] == [b.shape for b in ref]
    return all(np.allclose(a, b, rtol=TOL, atol=TOL) for a, b in zip(ours, ref, strict=True))


@pytest.fixture(scope="module")
def micro_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    rapidnet.save_weights(_micro(), path)
    return path


# ---- ONNX ----------------------------------------------------------------------------------------------------------


def test_onnx_classifier_matches_pytorch_with_dynamic_batch(tmp_path):
    import onnx

    model = _micro()
    result = export(model, tmp_path / "m.onnx", "onnx", resolution=(64, 96), dynamic_batch=True)
    assert result.ok and [c.name for c in result.checks] == ["random", "image"]
    assert all(c.max_abs_diff <= TOL for c in result.checks)  # outputs are O(10): absolute 1e-4 holds too
    assert result.checks[0].input_shape == (3, 3, 64, 96)  # the dynamic batch was exercised at batch 3

    proto = onnx.load(str(result.path))
    assert not (tmp_path / "m.onnx.data").exists()  # single file, weights inside
    assert proto.opset_import[0].version >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # the fused model was exported
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert read_metadata(result.path)["preprocess"]["input_size"] == [3, 64, 96]

    # independent check against the original, unfused model, at a batch size the export never saw
    x = torch.randn(5, 3, 64, 96)
    session = ort_session(result.path, threads=1)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert _close(run_ort(session, x), _outputs(model, x))


def test_onnx_features_only_has_named_outputs_and_matches(tmp_path):
    model = _micro(features_only=True)
    path = export_onnx(model, tmp_path / "f.onnx", (64, 64))
    session = ort_session(path, threads=1)
    assert [o.name for o in session.get_outputs()] == [f"features_{i}" for i in range(4)]
    x = torch.randn(1, 3, 64, 64)
    ours = run_ort(session, x)
    assert [o.shape for o in ours] == [(1, 16, 16, 16), (1, 24, 8, 8), (1, 32, 4, 4), (1, 48, 2, 2)]
    assert _close(ours, _outputs(model, x))


def test_verification_reports_a_wrong_model(tmp_path):
    path = export_onnx(_micro(seed=0), tmp_path / "a.onnx", (32, 32))
    checks = verify_file(path, _micro(seed=1), {"random": torch.randn(1, 3, 32, 32)})
    assert checks[0].max_abs_diff > 1e-2 and not checks[0].passed(TOL)


def test_full_size_rapidnet_ti_onnx_at_224(tmp_path):
    """The issue's acceptance figure, once: the real RapidNet-Ti at 224x224 within 1e-4 of PyTorch."""
    torch.manual_seed(0)
    model = randomize_(rapidnet.create_model("rapidnet_ti")).eval()
    with torch.no_grad():  # trained-like layer scales (randomize_'s 0.2..1 make 24 blocks grow logits to ~1e4)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.mul_(0.1)
    result = export(model, tmp_path / "ti.onnx", "onnx")
    assert result.input_shape == (1, 3, 224, 224) and result.outputs == {"logits": (1, 1000)}
    assert result.ok, result.lines()
    assert all(c.max_abs_diff <= TOL for c in result.checks), result.lines()


# ---- TorchScript ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features_only", [False, True])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch(tmp_path, features_only):
    model = _micro(features_only=features_only)
    result = export(model, tmp_path / "m.pt", "torchscript", resolution=(64, 64))
    assert result.ok and result.checks
    extra = {"rapidnet": ""}
    loaded = torch.jit.load(str(result.path), _extra_files=extra)
    assert json.loads(extra["rapidnet"])["outputs"][0] == ("features_0" if features_only else "logits")
    x = torch.randn(2, 3, 64, 64)  # traced at batch 1, used at batch 2
    assert _close(_outputs(loaded, x), _outputs(model, x))


# ---- Core ML -------------------------------------------------------------------------------------------------------


def test_coreml_package_spec(tmp_path):
    pytest.importorskip("coremltools")
    result = export(_micro(features_only=True), tmp_path / "f.mlpackage", "coreml", resolution=(64, 64), fp16=True)
    assert result.path.is_dir() and (result.path / "Manifest.json").exists()
    assert result.ok and not result.problems and "macOS" in result.note
    expected = {"features_0": (1, 16, 16, 16), "features_1": (1, 24, 8, 8), "features_2": (1, 32, 4, 4)}
    expected["features_3"] = (1, 48, 2, 2)
    assert coreml_spec_problems(result.path, (1, 3, 64, 64), expected) == []
    # the validator does fail on a wrong interface
    wrong = coreml_spec_problems(result.path, (1, 3, 32, 32), {"logits": (1, 10)})
    assert any("input shape" in p for p in wrong) and any("outputs are" in p for p in wrong)


# ---- OpenVINO and ExecuTorch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("features_only", [False, True])
def test_openvino_ir_matches_pytorch_in_openvino(tmp_path, features_only):
    """The IR (``.xml`` + float32 ``.bin``) runs in OpenVINO's CPU plugin within 1e-4 of the unfused model, at a batch
    size the export never saw (dynamic batch), with named inputs and outputs and the preprocessing metadata."""
    import openvino as ov

    from rapidnet.deploy.openvino import openvino_session, run_openvino

    model = _micro(features_only=features_only)
    result = export(model, tmp_path / "m.xml", "openvino", resolution=(64, 64), dynamic_batch=True)
    assert result.ok, result.lines()
    assert result.checks[0].input_shape == (3, 3, 64, 64) and (tmp_path / "m.bin").is_file()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary files left
    ir = ov.Core().read_model(str(result.path))
    names = [f"features_{i}" for i in range(4)] if features_only else ["logits"]
    assert [o.get_any_name() for o in ir.outputs] == names and ir.inputs[0].get_any_name() == "input"
    assert {op.get_type_name() for op in ir.get_ops()}.isdisjoint({"BatchNormInference", "Convert"})  # fused, fp32
    meta = json.loads(ir.get_rt_info("rapidnet").astype(str))
    assert meta["preprocess"]["input_size"] == [3, 64, 64] and meta["outputs"] == names
    x = torch.randn(5, 3, 64, 64)
    assert _close(run_openvino(openvino_session(result.path, threads=1), x), _outputs(model, x))


@pytest.mark.parametrize("features_only", [False, True])
def test_executorch_program_matches_pytorch_in_executorch(tmp_path, features_only):
    """The ``.pte`` (XNNPACK delegate) runs in ExecuTorch's runtime within 1e-4 of the unfused model; the lowering
    takes the plain folded graph (it fails on channels_last weights)."""
    from rapidnet.deploy.executorch import executorch_method, run_executorch

    model = _micro(features_only=features_only)
    compiled = rapidnet.deploy.compile_for_cpu(model)  # never called: handed to export, it is unwrapped
    result = export(compiled, tmp_path / "m.pte", "executorch", resolution=(64, 64))
    assert result.ok, result.lines()
    assert [c.input_shape for c in result.checks] == [(1, 3, 64, 64), (1, 3, 64, 64)]
    x = torch.randn(1, 3, 64, 64)
    ours = run_executorch(executorch_method(result.path), x)
    assert len(ours) == (4 if features_only else 1) and _close(ours, _outputs(model, x))


def test_new_formats_refuse_what_they_cannot_do(tmp_path):
    from rapidnet.deploy.executorch import export_executorch
    from rapidnet.deploy.openvino import export_openvino
    from rapidnet.errors import ConfigError

    model = _micro()
    with pytest.raises(ConfigError, match="one batch size"):
        export(model, tmp_path / "m.pte", "executorch", resolution=(32, 32), dynamic_batch=True)
    with pytest.raises(ConfigError, match=r"must end in \.xml"):
        export_openvino(model, tmp_path / "m.onnx", (32, 32))
    with pytest.raises(ConfigError, match=r"must end in \.pte"):
        export_executorch(model, tmp_path / "m.onnx", (32, 32))
    assert not list(tmp_path.iterdir())


# ---- CLI -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["openvino", "executorch"])
def test_cli_export_openvino_and_executorch(capsys, tmp_path, micro_file, fmt):
    out_path = tmp_path / f"micro{'.xml' if fmt == 'openvino' else '.pte'}"
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(micro_file), "--format", fmt, "--resolution", "32",
                             "32", "--output", str(out_path))  # fmt: skip
    assert code == 0 and out_path.is_file(), err
    assert f"max |{fmt} - pytorch|" in out and out.count(": ok)") == 2 and "cpuinfo" not in err


def test_cli_export_onnx_from_checkpoint(capsys, tmp_path, micro_file):
    out_path = tmp_path / "out" / "micro.onnx"
    code, out, _ = run_cli(
        capsys, "export", "--checkpoint", str(micro_file), "--resolution", "32", "32", "--output", str(out_path)
    )
    assert code == 0 and out_path.is_file()
    assert "max |onnx - pytorch|" in out and "MISMATCH" not in out and out.count(": ok)") == 2
    model = rapidnet.load_model(micro_file).eval()
    x = torch.randn(1, 3, 32, 32)
    assert _close(run_ort(ort_session(out_path, threads=1), x), _outputs(model, x))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "rapidnet_xl"], "unknown model 'rapidnet_xl'"),
        (["--model", "rapidnet_ti", "--checkpoint", "{ckpt}"], "not rapidnet_ti"),
        (["--checkpoint", "{ckpt}", "--resolution", "31", "64"], "too small"),
        (["--checkpoint", "{ckpt}", "--output", "{ckpt}/x.onnx"], "cannot write"),
        (["--checkpoint", "{ckpt}", "--fp16"], "--fp16 applies to --format coreml only"),
        (["--checkpoint", "{tmp}/missing.pth"], "checkpoint not found"),
    ],
)
def test_cli_export_bad_input_is_one_line(capsys, tmp_path, micro_file, argv, message):
    argv = [a.format(ckpt=micro_file, tmp=tmp_path) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "m.onnx")]
    code, out, err = run_cli(capsys, "export", *argv)
    assert code == 2, out
    assert err.startswith("rapidnet export: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_checkpoint_that_does_not_fit(capsys, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"stem.0.conv.weight": torch.zeros(8, 3, 3, 3)}}, path)
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(path), "--output", str(tmp_path / "m.onnx"))
    assert code == 2 and err.startswith("rapidnet export: error: ") and err.count("\n") == 1


# ---- XNNPACK rewrites (issue 15 item 4): large depthwise convs as strips XNNPACK runs with its own kernels --------


@pytest.mark.parametrize(("kernel", "padding", "bias"), [(7, 3, True), (7, 3, False), (9, 4, True), (7, 0, True)])
def test_striped_depthwise_equals_the_conv(kernel, padding, bias):
    from rapidnet.deploy.xnnpack import MAX_DEPTHWISE_TAPS, StripedDepthwiseConv2d

    torch.manual_seed(kernel + padding)
    conv = torch.nn.Conv2d(12, 12, kernel, padding=padding, groups=12, bias=bias).eval()
    striped = StripedDepthwiseConv2d(conv)
    assert all(s.kernel_size[0] * s.kernel_size[1] <= MAX_DEPTHWISE_TAPS for s in striped.strips)
    assert sum(s.kernel_size[1] for s in striped.strips) == kernel and len(striped.strips) > 1
    x = torch.randn(2, 12, 15, 11)
    with torch.no_grad():
        torch.testing.assert_close(striped(x), conv(x), rtol=1e-5, atol=1e-5)


def test_for_xnnpack_rewrites_only_large_stride_one_depthwise_convs():
    from rapidnet.deploy.xnnpack import StripedDepthwiseConv2d, for_xnnpack

    model = rapidnet.reparameterize(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    rewritten = for_xnnpack(model)
    dilated_blocks = sum(1 for m in model.modules() if type(m).__name__ == "DilatedConvBlock")
    striped = [m for m in rewritten.modules() if isinstance(m, StripedDepthwiseConv2d)]
    assert len(striped) == 2 * dilated_blocks > 0  # the 7x7 CPE and FFN convs of every block
    assert not any(isinstance(m, StripedDepthwiseConv2d) for m in model.modules())  # the original is untouched
    others = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 5, padding=2, groups=8),  # 25 taps: XNNPACK's own tile already
        torch.nn.Conv2d(8, 8, 7, stride=2, padding=3, groups=8),  # strided: left alone
        torch.nn.Conv2d(8, 8, 7, padding=3),  # dense
    )
    assert not any(isinstance(m, StripedDepthwiseConv2d) for m in for_xnnpack(others).modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), rtol=1e-5, atol=1e-5)
