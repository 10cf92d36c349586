"""One registry of runtimes; every exported file runs through the CLI as its checkpoint does (predict, eval)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rapidnet
from conftest import run_cli
from rapidnet.data import FASHION_MNIST_CLASSES
from rapidnet.deploy import registry
from rapidnet.deploy.common import Runtime, sidecar_path
from rapidnet.errors import ConfigError

SAMPLE = Path(rapidnet.__file__).parent / "assets" / "sample_ankle_boot.png"


# ---- the registry --------------------------------------------------------------------------------------------------


def test_one_name_and_one_suffix_per_runtime():
    table = registry.suffixes()
    assert len(set(table.values())) == len(table) == len(registry.file_runtimes())
    for name in registry.names():
        runtime = registry.get(name)
        assert isinstance(runtime, Runtime) and runtime.name == name
        if name in registry.file_runtimes():
            assert table[runtime.suffix] == name
        # the registry's static list of quantizing runtimes is what the modules say
        assert (runtime.quantizer is not None) == (name in registry.quantizing()), name
    for old, new in registry.ALIASES.items():
        assert registry.get(old) is registry.get(new)
    assert registry.for_path("m.TFLITE").name == "litert" and registry.for_path("x/m.xml").name == "openvino"
    with pytest.raises(ConfigError, match=r"cannot tell which runtime runs m\.bin"):
        registry.for_path("m.bin")
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        registry.get("tensorrt")


def test_backends_are_runtimes_and_their_int8():
    names = registry.backend_names()
    assert {"onnx", "onnx-int8", "litert", "litert-int8", "torch-compile", "aoti"} <= set(names)
    assert "coreml" not in names and "torchscript-int8" not in names
    runtime, int8 = registry.parse_backend("openvino-int8")
    assert runtime.name == "openvino" and int8
    assert registry.backend_name("ort-fp32") == "onnx" and registry.backend_name("ort-int8") == "onnx-int8"
    with pytest.raises(ConfigError, match="unknown backend 'coreml'"):
        registry.parse_backend("coreml")


def test_no_runtime_branches_outside_the_runtime_modules():
    """The verbs dispatch through the registry: no ``== "openvino"``-style comparisons of runtime names."""
    deploy = Path(rapidnet.__file__).parent / "deploy"
    runtime_modules = {f"{m.split('.')[-1]}.py" for m, _, _ in registry._RUNTIMES.values()}
    names = [n for n in registry.names() if n not in ("torch",)]
    for path in [*deploy.glob("*.py"), *(deploy.parent / "cli").glob("*.py")]:
        if path.name in runtime_modules or path.name == "registry.py":
            continue
        text = path.read_text()
        for name in names if path.parent.name == "deploy" else [n for n in names if n != "cuda"]:  # device.type
            for pattern in (f'== "{name}"', f'!= "{name}"', f'.startswith("{name}'):
                assert pattern not in text, f"{path.name}: {pattern}"


def test_sidecar_files_are_exported_files_and_torchscript_is_told_from_a_checkpoint(tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.save({"model": {}}, ckpt)
    assert not registry.is_exported_file(ckpt) and not registry.is_exported_file(tmp_path / "missing.pt")
    traced = torch.jit.trace(torch.nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 4, 4))
    traced.save(str(tmp_path / "s.pt"))
    assert registry.is_exported_file(tmp_path / "s.pt")
    assert registry.is_exported_file(tmp_path / "m.onnx") and not registry.is_exported_file(tmp_path / "m.pth")


# ---- exported files through predict and eval -----------------------------------------------------------------------


def _runtimes_here() -> list[str]:
    wanted = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch", "litert": "litert_torch"}
    wanted["torchscript"] = "torch"
    return [n for n, pkg in wanted.items() if importlib.util.find_spec(pkg) is not None]


@pytest.fixture(scope="module")
def classifier(fmnist_micro_checkpoint) -> Path:
    return fmnist_micro_checkpoint


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory) -> dict[str, Path]:
    """The classifier exported at its own input size to every runtime installed here, through ``rapidnet export``."""
    from rapidnet.cli.main import main

    folder = tmp_path_factory.mktemp("exported")
    files = {}
    for name in _runtimes_here():
        out = folder / f"micro{registry.get(name).suffix}"
        argv = ["export", "--checkpoint", classifier, "--format", name, "--output", out]
        assert main([str(a) for a in argv]) == 0, name
        files[name] = out
    return files


def test_exported_files_carry_the_class_names(exported):
    for name, path in exported.items():
        meta = registry.for_path(path).read_metadata(path)
        assert meta["class_names"] == list(FASHION_MNIST_CLASSES), name
        assert meta["preprocess"]["input_size"] == [3, 224, 224] and meta["outputs"] == ["logits"]
    if "executorch" in exported:  # .pte has no metadata slot: a sidecar beside it
        assert sidecar_path(exported["executorch"]).is_file()


def test_predict_runs_every_exported_file_like_its_checkpoint(capsys, classifier, exported):
    code, out, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", classifier, "--top-k", "3", "--json")
    assert code == 0, err
    expected = json.loads(out)[0]["top"]
    for name, path in exported.items():
        code, out, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", path, "--top-k", "3", "--json")
        assert code == 0, (name, err)
        top = json.loads(out)[0]["top"]
        assert [p["class"] for p in top] == [p["class"] for p in expected], name
        assert [p["prob"] for p in top] == pytest.approx([p["prob"] for p in expected], abs=1e-4), name
    code, out, _ = run_cli(capsys, "predict", SAMPLE, "--checkpoint", exported["onnx"], "--top-k", "1")
    assert code == 0 and expected[0]["class"] in out  # the plain listing names the class too


def test_eval_of_fp32_files_equals_the_checkpoints(capsys, classifier, exported, fm_root):
    argv = ["--data", fm_root, "--limit", "16", "--batch-size", "8", "--workers", "0", "--json"]
    code, out, err = run_cli(capsys, "eval", "--checkpoint", classifier, *argv)
    assert code == 0, err
    reference = json.loads(out)
    for name, path in exported.items():
        code, out, err = run_cli(capsys, "eval", "--checkpoint", path, *argv)
        assert code == 0, (name, err)
        result = json.loads(out)
        assert result["images"] == reference["images"] == 16 and result["runtime"] == name
        assert result["top1"] == pytest.approx(reference["top1"], abs=100 / 16 + 1e-6), name  # one near-tie at most
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-3, abs=1e-4), name


def test_predict_top1_of_a_file_equals_pytorch_at_its_size(exported, classifier):
    """The file's logits on the sample image through its own preprocessing equal PyTorch's through the same."""
    from PIL import Image

    from rapidnet.deploy.common import eval_transform

    model = rapidnet.load_model(classifier).eval()
    for name, path in exported.items():
        loaded, meta = registry.load_exported(path)
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()}
        x = eval_transform(cfg)(Image.open(SAMPLE).convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ("[1, 2]", "not a JSON object"),
        ("{not json", "unreadable"),
        ('{"class_names": "shirt"}', "class names"),
        ('{"class_names": ["a", "b"]}', "2 class names for 10 outputs"),
    ],
)
def test_hostile_metadata_is_one_line(capsys, exported, tmp_path, sidecar, message):
    if "executorch" not in exported:
        pytest.skip("needs executorch (the sidecar format)")
    import shutil

    path = tmp_path / "m.pte"
    shutil.copy(exported["executorch"], path)
    sidecar_path(path).write_text(sidecar)
    code, _, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", path)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_exported_file_refuses_checkpoint_only_options(capsys, exported, fm_root):
    path = next(iter(exported.values()))
    code, _, err = run_cli(capsys, "eval", "--checkpoint", path, "--data", fm_root, "--reparameterize")
    assert code == 2 and "--reparameterize does not apply" in err
    code, _, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", path, "--model", "rapidnet_s")
    assert code == 2 and "--model does not apply" in err


def test_bench_times_exported_files_as_they_are(capsys, exported, tmp_path):
    files = [exported[n] for n in ("onnx", "litert", "torchscript") if n in exported]
    code, _, err = run_cli(capsys, "bench", "--checkpoint", *files, "--threads", "1", "--rounds", "2", "--output",
                           tmp_path, "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["file"] for r in report["results"]] == [str(f) for f in files]
    assert [r["backend"] for r in report["results"]] == [registry.for_path(f).name for f in files]
    for r in report["results"]:
        assert r["samples"] == 2 and r["median_ms"] > 0 and r["batch"] == 1 and r["resolution"] == [224, 224]
        assert r["model"] == "custom" and r["achieved_gflops"] is None  # a file's GMACs are not counted
    code, _, err = run_cli(capsys, "bench", "--checkpoint", tmp_path / "m.bin")
    assert code == 2 and "cannot tell which runtime" in err


def test_bench_times_the_semantic_fpn_graph_beside_a_peer():
    from rapidnet.deploy import bench

    report = bench.run_benchmark(["semantic_fpn:rapidnet_ti", "semantic_fpn:mobilenetv2_100"], ["torch", "onnx"],
                                 resolution=64, threads=1, rounds=2, warmup=0, progress=False)  # fmt: skip
    rows = {(r["model"], r["backend"]): r for r in report["results"]}
    assert report["failures"] == [] and len(rows) == 4
    ti, mnv2 = rows["semantic_fpn:rapidnet_ti", "torch"], rows["semantic_fpn:mobilenetv2_100", "torch"]
    assert ti["gmacs"] > 0 and ti["params"] > mnv2["params"] > 0
    with pytest.raises(ConfigError, match="semantic_fpn:<one of them>"):
        bench.check_model_names(["semantic_fpn:nonet"])
