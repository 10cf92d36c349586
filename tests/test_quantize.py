"""int8 quantization (issue 4, item 2): QDQ per-channel model, calibration sources, the fp32-vs-int8 report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rapidnet
from conftest import MICRO, randomize_
from rapidnet.cli.main import main
from rapidnet.data import write_idx
from rapidnet.deploy import calibration_dataset, compare_accuracy, eval_transform
from rapidnet.deploy.common import rebatch
from rapidnet.deploy.onnx import ort_session, run_ort
from rapidnet.deploy.quantize import ImageFiles, numpy_batches
from rapidnet.utils import subset_indices


def _fake_fashion_mnist(root: Path, n_train: int = 48, n_test: int = 40) -> Path:
    """Tiny IDX files: class k is a horizontal bar at height 2k, so images differ by class."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 7] = 230
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    return _fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def micro_file(fmnist_micro_checkpoint) -> Path:
    return fmnist_micro_checkpoint


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, fmnist, micro_file) -> tuple[int, Path, str]:
    """One end-to-end ``rapidnet quantize`` run, shared by the tests that inspect its results."""
    out = tmp_path_factory.mktemp("q") / "micro_int8.onnx"
    argv = ["quantize", "--checkpoint", str(micro_file), "--calib", str(fmnist), "--calib-size", "32"]
    argv += ["--eval-data", str(fmnist), "--eval-size", "0", "--output", str(out), "--resolution", "32", "32"]
    argv += ["--save-fp32", str(out.with_name("micro_fp32.onnx")), "--threads", "1"]
    return main(argv), out, str(fmnist)


def _eval_images(fmnist: Path, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    from rapidnet.deploy.quantize import numpy_batches

    cfg = {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 0.9}
    cfg |= {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    ds = rapidnet.data.build_dataset(fmnist, "val", transform=eval_transform(cfg))
    images, labels = zip(*numpy_batches(ds, range(len(ds)), batch_size=64), strict=True)
    return np.concatenate(images), np.concatenate(labels)


def test_quantized_model_is_qdq_per_channel_and_close_to_fp32(quantized, fmnist):
    import onnx

    code, out, _ = quantized
    assert code == 0 and out.is_file()
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0 and "QLinearConv" not in ops
    init = {i.name: i for i in proto.graph.initializer}
    # per-channel: every Conv weight is dequantized with one scale per output channel (axis 0)
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    dq_weights = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights]
    assert len(dq_weights) == len(conv_weights) > 10
    for node in dq_weights:
        scale = onnx.numpy_helper.to_array(init[node.input[1]])
        weight = init[node.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8 and scale.shape == (weight.dims[0],)
    assert out.stat().st_size < 0.7 * out.with_name("micro_fp32.onnx").stat().st_size

    images, _ = _eval_images(fmnist)
    fp32 = run_ort(ort_session(out.with_name("micro_fp32.onnx"), threads=1), images)[0]
    int8 = run_ort(ort_session(out, threads=1), images)[0]
    assert fp32.shape == int8.shape == (len(images), 10)
    assert np.abs(int8 - fp32).max() > 0  # it really is a different (quantized) model
    cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosine.min() > 0.98, cosine.min()
    assert np.abs(int8 - fp32).mean() < 0.1 * np.abs(fp32).mean()


def test_report_has_both_top1s_and_agreement(quantized, fmnist, micro_file):
    code, out, _ = quantized
    report = json.loads(out.with_suffix(".json").read_text())
    ev = report["evaluation"]
    assert code == 0 and ev["images"] == 40 and ev["split"] == "test (held out)"
    assert report["calibration"]["images"] == 32 and report["calibration"]["split"] == "train"
    assert report["quantization"]["format"] == "QDQ" and report["quantization"]["weights"] == "int8 per-channel"
    assert report["input_size"] == [3, 32, 32]
    # fp32 top-1 equals PyTorch's on the same held-out images
    images, labels = _eval_images(fmnist)
    model = rapidnet.load_model(micro_file).eval()
    with torch.no_grad():
        torch_top1 = 100 * float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())
    assert ev["fp32_top1"] == pytest.approx(torch_top1, abs=1e-3)
    assert 0 <= ev["int8_top1"] <= 100 and ev["top1_drop"] == pytest.approx(ev["fp32_top1"] - ev["int8_top1"])
    assert ev["agreement"] >= 70


def test_quantize_from_exported_onnx_uses_its_metadata(capsys, quantized, fmnist, tmp_path):
    _, out, _ = quantized
    fp32 = out.with_name("micro_fp32.onnx")
    target = tmp_path / "again_int8.onnx"
    code = main(
        ["quantize", "--checkpoint", str(fp32), "--calib", str(fmnist), "--calib-size", "8", "--output", str(target)]
    )
    printed = capsys.readouterr().out
    assert code == 0 and target.is_file() and "no accuracy check" in printed
    assert json.loads(target.with_suffix(".json").read_text())["input_size"] == [3, 32, 32]  # from the metadata

    argv = ["quantize", "--checkpoint", str(fp32), "--calib", str(fmnist), "--resolution", "64", "64"]
    code = main([*argv, "--output", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "takes 32x32 images" in err and err.count("\n") == 1


def test_static_batch_export_and_array_calibration(tmp_path):
    """The benchmark's route: a fixed batch of 2 and synthetic calibration batches instead of a data set."""
    import onnx

    from rapidnet.deploy.onnx import export_onnx, quantize_onnx

    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    fp32 = export_onnx(model, tmp_path / "b2.onnx", (32, 32), batch_size=2)
    assert onnx.load(str(fp32)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    batches = [np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32) for i in range(3)]
    int8 = quantize_onnx(fp32, tmp_path / "b2_int8.onnx", batches)
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert run_ort(ort_session(int8, threads=1), batches[0])[0].shape == (2, 10)


@pytest.mark.parametrize("saturates", [False, True])
def test_weights_keep_to_7_bits_where_the_cpu_saturates(tmp_path, monkeypatch, saturates):
    """x86 without VNNI (onnxruntime's u8s8 kernels overflow 16 bits): 7-bit weights, said in the report."""
    import onnx

    import rapidnet.deploy.onnx as quantize

    monkeypatch.setattr(quantize, "cpu_int8_saturates", lambda: saturates)
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    fp32 = quantize.export_onnx(model, tmp_path / "m.onnx", (32, 32), batch_size=2)
    batches = [np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32) for i in range(2)]

    def weight_peak(path: Path) -> int:
        """The largest |value| among the model's int8 initializers (the weights and their zero points)."""
        arrays = (onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer)
        return max(int(np.abs(a.astype(np.int32)).max()) for a in arrays if a.dtype == np.int8)

    top = weight_peak(quantize.quantize_onnx(fp32, tmp_path / "m_int8.onnx", batches))
    assert top <= 64 if saturates else top == 127  # 7 bits: [-64, 63]; per-channel 8 bits reach 127
    assert weight_peak(quantize.quantize_onnx(fp32, tmp_path / "m_full.onnx", batches, reduce_range=False)) == 127


def test_cpu_int8_saturates_on_x86_without_vnni(monkeypatch):
    import rapidnet.utils as utils

    cases = [
        ("x86_64", {"avx2", "fma"}, True),
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
        ("AMD64", {"avx_vnni"}, False),
        ("x86_64", set(), True),  # no /proc/cpuinfo: assume the worst
        ("aarch64", set(), False),
    ]
    for machine, flags, expected in cases:
        monkeypatch.setattr(utils.platform, "machine", lambda m=machine: m)
        monkeypatch.setattr(utils, "cpu_flags", lambda f=flags: frozenset(f))
        assert utils.cpu_int8_saturates() is expected, (machine, flags)


def test_compare_accuracy_arithmetic():
    """Top-1 and agreement from fixed logits: fp32 right on 3/4, int8 right on 2/4, agreeing on 3/4."""

    class Fixed:
        def __init__(self, logits):
            self.logits = np.asarray(logits, dtype=np.float32)

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, _, feeds):
            return [self.logits[: len(feeds["input"])]]

    data = [(np.zeros((3, 4, 4), np.float32), label) for label in (0, 1, 1, 0)]
    fp32 = Fixed([[1, 0], [0, 1], [0, 1], [0, 1]])
    int8 = Fixed([[1, 0], [0, 1], [1, 0], [0, 1]])
    result = compare_accuracy(fp32, int8, data, range(4), batch_size=4)
    assert (result.images, result.fp32_top1, result.int8_top1, result.agreement) == (4, 75.0, 50.0, 75.0)
    assert result.top1_drop == 25.0 and result.max_abs_logit_diff == 1.0


def test_calibration_sources(tmp_path, fmnist):
    from PIL import Image

    flat = tmp_path / "photos" / "nested"
    flat.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 10, 200)).save(flat / f"p{i}.png")
    (flat / "notes.txt").write_text("not an image")
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    folder = calibration_dataset(tmp_path / "photos", eval_transform(cfg))
    assert isinstance(folder, ImageFiles) and len(folder) == 3

    singles = [images for images, _ in numpy_batches(folder, range(3), batch_size=1)]
    assert [b.shape for b in singles] == [(1, 3, 32, 32)] * 3 and singles[0].dtype == np.float32
    # a file made for batch 2 calibrates on batches of 2: the remainder dropped, or padded with its last image
    assert [b.shape[0] for b in rebatch(singles, 2)] == [2]
    padded = rebatch(singles, 2, pad=True)
    assert [b.shape[0] for b in padded] == [2, 2] and np.array_equal(padded[1][0], padded[1][1])
    assert [b.shape[0] for b in rebatch(singles[:1], 4)] == [4]  # never none at all

    idx = calibration_dataset(fmnist)
    assert len(idx) == 48 and idx[0][0].mode == "RGB"  # the train split, as RGB images
    assert subset_indices(100, 10, seed=1) == subset_indices(100, 10, seed=1) != subset_indices(100, 10, seed=2)
    assert subset_indices(5, 0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--calib", "{tmp}/empty"], "no images in"),
        (["--calib", "{fm}", "--eval-data", "{tmp}/missing"], "does not exist"),
        (["--calib", "{fm}", "--resolution", "16", "16"], "too small"),
        (["--calib", "{fm}", "--output", "{ckpt}/x_int8.onnx"], "cannot write"),
        (["--calib", "{fm}", "--model", "rapidnet_nano"], "unknown model"),
        (["--calib", "{fm}", "--model", "rapidnet_s"], "not rapidnet_s"),
    ],
)
def test_quantize_bad_input_is_one_line(capsys, tmp_path, fmnist, micro_file, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, fm=fmnist, ckpt=micro_file) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "q.onnx")]
    code = main(["quantize", "--checkpoint", str(micro_file), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rapidnet quantize: error: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "q.onnx").exists()


def test_quantize_refuses_mismatched_classes(capsys, tmp_path, fmnist):
    model = rapidnet.create_model("rapidnet_ti", num_classes=5, **MICRO)
    path = tmp_path / "five.safetensors"
    rapidnet.save_weights(model, path)
    argv = ["quantize", "--checkpoint", str(path), "--calib", str(fmnist), "--eval-data", str(fmnist)]
    code = main([*argv, "--output", str(tmp_path / "q.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "predicts 5 classes" in err and not (tmp_path / "q.onnx").exists()


# ---- OpenVINO (NNCF) and ExecuTorch (pt2e + XNNPACKQuantizer), issue 15 item 2 ------------------------------------


@pytest.fixture(scope="module", params=["openvino", "executorch"])
def runtime_quantized(request, tmp_path_factory, fmnist, micro_file) -> tuple[str, int, Path]:
    """One ``rapidnet quantize`` run per runtime, the runtime chosen by the output's suffix."""
    pytest.importorskip("nncf" if request.param == "openvino" else "executorch")
    suffix = {"openvino": ".xml", "executorch": ".pte"}[request.param]
    out = tmp_path_factory.mktemp(request.param) / f"micro_int8{suffix}"
    argv = ["quantize", "--checkpoint", str(micro_file), "--calib", str(fmnist), "--calib-size", "16"]
    argv += ["--eval-data", str(fmnist), "--eval-size", "0", "--output", str(out), "--resolution", "32", "32"]
    argv += ["--save-fp32", str(out.with_name(f"micro_fp32{suffix}")), "--threads", "1"]
    # in a process of its own: after other tests have run OpenVINO, NNCF and ExecuTorch in this one, the command's
    # in-process evaluation was seen to disagree with a fresh run of the same files on 2 of 40 near-tied images
    done = subprocess.run([sys.executable, "-m", "rapidnet", *argv], capture_output=True, text=True, timeout=600)
    return request.param, done.returncode, out


def test_runtime_int8_is_quantized_and_agrees_with_fp32(runtime_quantized, fmnist, micro_file):
    from rapidnet.deploy import load_runner

    runtime, code, out = runtime_quantized
    assert code == 0 and out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["quantization"]["runtime"].startswith(runtime)
    assert report["calibration"]["images"] == 16 and report["evaluation"]["images"] == 40
    if runtime == "openvino":  # int8 weights: FakeQuantize nodes in the graph, a smaller .bin
        import openvino as ov

        ops = {op.get_type_name() for op in ov.Core().read_model(str(out)).get_ops()}
        assert "FakeQuantize" in ops and out.with_suffix(".bin").is_file()
    assert report["sizes_bytes"]["int8"] < 0.7 * report["sizes_bytes"]["fp32"]

    images, labels = _eval_images(fmnist)
    fp32, int8 = (load_runner(p, threads=1)(images)[0] for p in (out.with_name(f"micro_fp32{out.suffix}"), out))
    assert fp32.shape == int8.shape == (40, 10) and np.abs(int8 - fp32).max() > 0
    cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosine.min() > 0.95, cosine.min()
    # the report's fp32 top-1 is the fp32 file's, whose logits are PyTorch's. Compared as logits: a top-1 can flip on
    # a near-tie between two float-rounding orders (the report's chunked batches against this one batch of 40; up to
    # two flips were seen once other tests had run the runtimes in this process), so top-1s agree to two images
    own_top1 = 100 * float((fp32.argmax(1) == labels).mean())
    assert abs(report["evaluation"]["fp32_top1"] - own_top1) <= 2 * 100 / len(labels) + 1e-6
    model = rapidnet.load_model(micro_file).eval()
    with torch.no_grad():
        np.testing.assert_allclose(fp32, model(torch.from_numpy(images)).numpy(), rtol=1e-3, atol=1e-3)
    own_agreement = 100 * float((fp32.argmax(1) == int8.argmax(1)).mean())
    assert abs(report["evaluation"]["agreement"] - own_agreement) <= 2 * 100 / len(labels) + 1e-6


@pytest.mark.parametrize(
    ("extra", "output", "message"),
    [
        (["--runtime", "openvino"], "q.onnx", "OpenVINO int8 model"),
        ([], "q.pt", "must end in one of .onnx (onnx), .xml (openvino), .pte (executorch)"),
        (["--all-ops"], "q.xml", "--all-ops is not an option of OpenVINO's quantizer"),
        (["--per-tensor"], "q.xml", "--per-tensor is not an option of OpenVINO's quantizer"),
        (["--save-fp32", "{tmp}/f.onnx"], "q.pte", "--save-fp32 file"),
        (["--save-fp32", "{tmp}/q.onnx"], "q.onnx", "are the same file"),
    ],
)
def test_runtime_quantize_bad_options_are_one_line(capsys, tmp_path, fmnist, micro_file, extra, output, message):
    extra = [a.format(tmp=tmp_path) for a in extra]
    argv = ["quantize", "--checkpoint", str(micro_file), "--calib", str(fmnist), "--output", str(tmp_path / output)]
    code = main([*argv, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / output).exists()


def test_runner_chunks_a_fixed_batch_program():
    """A fixed-batch file runs any batch: chunks of its batch, the last one padded and cut back."""
    from rapidnet.deploy import Runner

    calls: list[int] = []

    def double(x: np.ndarray) -> list[np.ndarray]:
        calls.append(len(x))
        assert len(x) == 2
        return [2 * x.reshape(len(x), -1)]

    out = Runner(Path("m.pte"), "executorch", 2, double)(np.arange(5 * 3, dtype=np.float32).reshape(5, 3))
    assert calls == [2, 2, 2] and out[0].shape == (5, 3)
    np.testing.assert_array_equal(out[0], 2 * np.arange(15, dtype=np.float32).reshape(5, 3))


def _with_external_data(tmp_path: Path, fp32: Path, location: str) -> Path:
    """A copy of ``fp32`` whose first initializer's bytes live in an external file named ``location``."""
    import onnx

    proto = onnx.load(str(fp32))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    out = tmp_path / "model" / "ext.onnx"
    out.parent.mkdir(exist_ok=True)
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../outside.bin", "outside the model's folder"),
        ("/etc/passwd", "outside"),
        ("link.bin", "outside"),
        ("gone.bin", "is missing"),
    ],
)
def test_quantize_refuses_unsafe_external_data(capsys, tmp_path, quantized, fmnist, location, message):
    _, out, _ = quantized
    model = _with_external_data(tmp_path, out.with_name("micro_fp32.onnx"), location)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    (model.parent / "link.bin").symlink_to(tmp_path / "outside.bin")
    argv = ["quantize", "--checkpoint", str(model), "--calib", str(fmnist), "--output", str(tmp_path / "q.onnx")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "q.onnx").exists()


def test_quantize_refuses_to_overwrite_its_source(capsys, tmp_path, fmnist, micro_file):
    import shutil

    source = tmp_path / "m.safetensors"
    shutil.copy(micro_file, source)
    before = source.read_bytes()
    for output in (source, tmp_path / "m.json"):
        argv = ["quantize", "--checkpoint", str(source), "--calib", str(fmnist), "--output", str(output)]
        if output.suffix == ".json":  # the report of m.onnx is m.json: refused when m.json is the checkpoint
            source.rename(output)
            argv = [
                "quantize",
                "--checkpoint",
                str(output),
                "--calib",
                str(fmnist),
                "--output",
                str(tmp_path / "m.onnx"),
            ]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "same file as the input" in err and err.count("\n") == 1
    assert (tmp_path / "m.json").read_bytes() == before
