"""TorchInductor runtimes (``torch-compile``, ``aoti``) and the eager benchmark backends (``torch``, ``torch-cl``).

Compiling is the slow part (10-20 s per model on two cores): one dynamic-batch AOTI package serves the export,
metadata and batch checks, one fixed-batch package the benchmark's path.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.deploy import common, prepare_model
from rapidnet.deploy.eager import EagerCuda, EagerTorch, EagerTorchChannelsLast
from rapidnet.deploy.inductor import AOTInductor, TorchCompile, _quiet_compile, compile_for_cpu
from rapidnet.errors import CheckpointError, ConfigError

TOL = 1e-4
RES = (64, 64)


def _micro(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO), seed).eval()


def _reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, torch.nn.Module, str]:
    """A dynamic-batch AOTI package of the micro model at 64x64 with class names in its metadata."""
    model = _micro()
    meta = common.export_metadata(model, common.preprocess_config(model, RES), {"class_names": list("abcdefghij")})
    path = tmp_path_factory.mktemp("aoti") / "micro.pt2"
    out = AOTInductor().export(model, path, RES, dynamic_batch=True, metadata=meta)
    return out, model, meta


def test_aoti_package_matches_pytorch_at_any_batch_and_carries_metadata(package):
    path, model, meta = package
    assert path.is_file() and not list(path.parent.glob(".*tmp*")), "written atomically, no temporary left"
    assert not common.sidecar_path(path).exists(), "the metadata lives inside the package"
    runtime = AOTInductor()
    runner = runtime.load(path, threads=1)
    assert runner.runtime == "aoti" and runner.fixed_batch is None
    for batch in (1, 3):  # a batch of 1 and one the export never traced
        x = torch.randn(batch, 3, *RES)
        (out,) = runner(x)
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, _reference(model, x), rtol=TOL, atol=TOL)
    assert runner.metadata == json.loads(meta) == runtime.read_metadata(path)
    assert runner.input_size == (3, *RES) and runner.metadata["class_names"][0] == "a"


def test_aoti_bench_runner_runs_a_fixed_batch_package(tmp_path):
    """The benchmark's path: a package made for the batch, loaded back; it also serves other batches in chunks."""
    model = _micro(1)
    x = torch.randn(2, 3, *RES)
    run = AOTInductor().bench_runner(model, x, threads=1, workdir=tmp_path)
    np.testing.assert_allclose(run()[0], _reference(model, x), rtol=TOL, atol=TOL)
    (path,) = tmp_path.glob("*.pt2")
    runner = AOTInductor().load(path)
    assert runner.fixed_batch == 2 and runner.metadata["outputs"] == ["logits"]
    x5 = torch.randn(5, 3, *RES)
    np.testing.assert_allclose(runner(x5)[0], _reference(model, x5), rtol=TOL, atol=TOL)


def test_aoti_bad_paths_are_one_line_errors(tmp_path, package):
    runtime = AOTInductor()
    with pytest.raises(ConfigError) as e:
        runtime.export(_micro(), tmp_path / "m.onnx", RES)
    assert ".pt2" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        runtime.load(tmp_path / "missing.pt2")
    assert "not found" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        runtime.read_metadata(tmp_path / "missing.pt2")
    assert "not found" in _one_line(e)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError) as e:
        runtime.load(garbage)
    assert "not an AOTInductor" in _one_line(e)
    other_zip = tmp_path / "other.pt2"  # a zip, but no compiled model inside (e.g. a torch.export-only archive)
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("other/archive_format", "pt2")
    with pytest.raises(CheckpointError) as e:
        runtime.read_metadata(other_zip)
    assert "not an AOTInductor" in _one_line(e)
    renamed = tmp_path / "micro.onnx"
    renamed.write_bytes(package[0].read_bytes())
    with pytest.raises(ConfigError) as e:
        runtime.load(renamed)
    assert ".pt2" in _one_line(e)


def test_torch_compile_bench_runner_equals_the_eager_model_and_freezes(tmp_path):
    from torch._inductor.utils import run_and_get_code

    model = _micro(2)
    x = torch.randn(2, 3, *RES)
    run, code = run_and_get_code(TorchCompile().bench_runner, model, x, threads=1, workdir=tmp_path)
    # frozen weights are what let Inductor prepack them and fuse conv+GELU into one oneDNN call; without freezing
    # at trace time it runs aten convolutions and a separate GELU
    assert "mkldnn._convolution_pointwise" in "\n".join(code)
    out = run()
    assert not torch.is_inference_mode_enabled()
    np.testing.assert_allclose(out.numpy(), _reference(model, x), rtol=TOL, atol=TOL)
    assert model.training is False and list(tmp_path.iterdir()) == []


def test_compile_for_cpu_leaves_the_model_alone():
    model = _micro(3).train()
    compiled = compile_for_cpu(model)
    assert type(compiled.module) is rapidnet.RapidNet and compiled.module is not model and not compiled.training
    assert model.training, "the caller's model stays as it was (trainable, unfolded)"
    assert {n for n, _ in compiled.named_parameters()} == {f"module.{n}" for n, _ in compiled.module.named_parameters()}


def test_compiled_model_pads_short_batches_and_exports_as_the_plain_model(tmp_path):
    """One compile serves a whole evaluation: a short last batch is padded to the compiled size and cut back."""
    model = _micro(4)
    compiled = compile_for_cpu(model, batch_size=3)
    full, short = torch.randn(3, 3, *RES), torch.randn(2, 3, *RES)
    graphs = torch._dynamo.utils.counters["stats"]
    with _quiet_compile():
        out_full = compiled(full)
        after_first = graphs["unique_graphs"]
        out_short = compiled(short)
    assert out_short.shape[0] == 2 and graphs["unique_graphs"] == after_first, "the short batch compiled again"
    np.testing.assert_allclose(out_full.numpy(), _reference(model, full), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(out_short.numpy(), _reference(model, short), rtol=TOL, atol=TOL)
    plain = prepare_model(compiled)
    assert plain is compiled.module and type(plain) is rapidnet.RapidNet
    assert prepare_model(torch.compile(model)) is not model, "torch.compile's wrapper unwraps to a folded copy"
    assert type(prepare_model(torch.compile(model))) is rapidnet.RapidNet


def test_eager_backends_run_the_model_as_given(tmp_path):
    plain = rapidnet.reparameterize(_micro(4))
    x = torch.randn(2, 3, *RES)
    ref = _reference(plain, x)
    for runtime in (EagerTorch(), EagerTorchChannelsLast()):
        out = runtime.bench_runner(plain, x, threads=1, workdir=tmp_path)()
        np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL)
    assert all(p.is_contiguous() for p in plain.parameters()), "torch-cl changed a copy, not the caller's model"
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    assert EagerTorch().model_for(other) is other
    assert EagerTorchChannelsLast().model_for(other) is not other
    assert EagerCuda().available() == torch.cuda.is_available()
