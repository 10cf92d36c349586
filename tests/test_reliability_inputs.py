"""Untrusted inputs (issue 16, items 4, 6 and 7): small files that asked for gigabytes, inputs that ended in a
traceback, and inputs that were accepted silently or read wrong.

Each test names the promise of docs/reliability.md it checks. Memory is measured as the growth of the process's peak
resident set (Linux ``VmHWM``, reset before the measured call), so torch's allocations count too.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import rapidnet
from conftest import MICRO, run_cli
from rapidnet.config import load_config
from rapidnet.data import ImageFolderDataset, build_dataset, load_rgb
from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError
from rapidnet.models.checkpoint import model_metadata
from rapidnet.utils import read_checkpoint

SAMPLE = Path(rapidnet.__file__).parent / "assets" / "sample_ankle_boot.png"
MB = 1 << 20


# ---- helpers -------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn()'s result or the RapidNetError it raised, bytes the peak RSS grew above the RSS before the call)``.

    The peak is reset first (``/proc/self/clear_refs``), so an earlier, larger test does not hide this one's peak.
    Other exceptions propagate.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except (OSError, KeyError):  # not Linux: no measurement
        pytest.skip("needs Linux /proc to measure peak memory")
    try:
        result: Any = fn()
    except RapidNetError as e:
        result = e
    return result, max(0, _status_kb("VmHWM") - before) * 1024


def last_line_error(err: str) -> str:
    """The error line of stderr (argparse prints its usage above it); there is exactly one line saying error."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert sum("error" in line for line in lines) == 1, err
    assert "Traceback" not in err
    return lines[-1]


def micro_file(tmp_path: Path, name: str = "m.safetensors", num_classes: int = 3, **meta: Any) -> Path:
    """A micro RapidNet's weights with extra metadata (dicts and lists stored as JSON, as this project writes)."""
    model = rapidnet.create_model("rapidnet_ti", num_classes=num_classes, **MICRO)
    stored = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return rapidnet.save_weights(model, tmp_path / name, stored)


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    blob = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    path.write_bytes(blob)
    return path


# ---- item 4: bounded memory on small untrusted files ---------------------------------------------------------------


def test_pretrained_cfg_asking_for_a_huge_input_is_refused_before_use(tmp_path, capsys):
    """input_size [3, 40000, 40000] in a 1 MB file made predict resize to 24 GB: now one line naming the key."""
    path = micro_file(tmp_path, pretrained_cfg={"input_size": [3, 40000, 40000]})
    with pytest.raises(CheckpointError, match=r"invalid 'pretrained_cfg' metadata \(input_size \[3, 40000, 40000\]"):
        rapidnet.load(path)
    code, _, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", path)
    assert code == 2 and "16..4096 pixels" in last_line_error(err) and err.count("\n") == 1
    ok = micro_file(tmp_path, "ok.safetensors", pretrained_cfg={"input_size": [3, 48, 48], "crop_pct": 1.0})
    model, _ = rapidnet.load(ok)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)


def test_yaml_aliases_are_refused_in_configs(tmp_path, capsys):
    """Nested anchors and aliases ("billion laughs": 500 bytes, a billion nodes once expanded) are one line, at the
    line of the first alias, whatever key holds them; the 9^9 bomb itself stays within a few MB."""
    small = tmp_path / "small.yaml"
    small.write_text("task:\n  a: &a [1, 2, 3]\n  b: [*a, *a, *a]\n")
    with pytest.raises(ConfigError, match=r"small.yaml line 3 .*aliases"):
        load_config(small)
    levels = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, 9):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("task:\n" + "".join(f"  {line}\n" for line in levels))
    assert bomb.stat().st_size < 1000
    result, grown = peak_memory_growth(lambda: load_config(bomb))
    assert isinstance(result, ConfigError) and "aliases" in str(result) and grown < 64 * MB
    code, _, err = run_cli(capsys, "train", "--config", bomb, "--output", tmp_path / "run")
    assert code == 2 and "aliases" in err and err.count("\n") == 1
    text = "{a: &a [1, 1], b: [*a, *a]}"  # an override is read with the same loader: its aliases stay text
    assert load_config(overrides=[f"task.x={text}"]).task["x"] == text


def test_decompression_bomb_png_is_one_line_and_costs_one_sample_in_training(tmp_path, capsys):
    """A PNG header claiming 60000x60000 raised Pillow's DecompressionBombError as a traceback; above Pillow's warning
    threshold (89 M pixels) the image was decoded. Both are refused from the header: one line for predict, a
    CorruptSample (the corrupt-image path) in an ImageFolder."""
    bomb = png_header(tmp_path / "bomb.png", 60000, 60000)
    code, _, err = run_cli(capsys, "predict", bomb)
    assert code == 2 and "decompression bomb" in last_line_error(err) and "3,600,000,000 pixels" in err
    large = png_header(tmp_path / "large.png", 10000, 10000)  # 100 M pixels: Pillow only warns
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    result, grown = peak_memory_growth(lambda: load_rgb(large))
    assert isinstance(result, DataError) and "10000x10000 pixels" in str(result) and grown < 64 * MB
    root = tmp_path / "folder"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(root / name / "ok.png")
    (root / "a" / "bomb.png").write_bytes(bomb.read_bytes())
    ds = ImageFolderDataset(root)
    marker = ds[ds.samples.index((str(root / "a" / "bomb.png"), 0))]
    assert type(marker).__name__ == "CorruptSample" and "decompression bomb" in marker.reason


def test_gzip_bomb_idx_file_is_refused_while_expanding(tmp_path):
    """A Fashion-MNIST ``.gz`` of 200 KB that expands to 200 MB was decompressed whole before its header was read."""
    import gzip

    from rapidnet.data import read_idx

    header = struct.pack(">BBBBIII", 0, 0, 8, 3, 60000, 28, 28)
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(header + bytes(400 * MB), compresslevel=1))
    assert bomb.stat().st_size < 4 * MB
    result, grown = peak_memory_growth(lambda: read_idx(bomb))
    # the 64 MB cap and its working copies: far below the 400 MB the file expands to
    assert isinstance(result, DataError) and "gzip bomb" in str(result) and grown < 192 * MB


def test_architecture_read_off_weights_must_fit_them_before_anything_is_built(tmp_path):
    """Empty tensors can make weight names and shapes describe a model of gigabytes in a file of kilobytes: the
    architecture is built on meta tensors first and compared with the file, so nothing is allocated."""
    model = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["stages.2.downsample.conv.weight"] = torch.zeros(2000, 0, 3, 3)  # stage 2 claims 2000 channels
    save_file(sd, str(tmp_path / "hollow.safetensors"), model_metadata(model))
    assert (tmp_path / "hollow.safetensors").stat().st_size < 2 * MB
    result, grown = peak_memory_growth(lambda: rapidnet.load(tmp_path / "hollow.safetensors"))
    assert isinstance(result, CheckpointError) and "stages.2" in str(result) and "\n" not in str(result)
    assert grown < 64 * MB


def _dense_file(tmp_path: Path, **build_changes: Any) -> Path:
    from rapidnet.models.segmentation import semantic_fpn

    net = semantic_fpn("rapidnet_ti", num_classes=3, backbone_kwargs=dict(MICRO), fpn_channels=16, head_channels=8)
    build_args = {**net.build_args, **build_changes}
    meta = {
        "format": "rapidnet-segmentation",
        "task": "segmentation",
        "build_args": json.dumps(build_args),
        "class_names": json.dumps(["a", "b", "c"]),
        "eval_args": json.dumps({"num_classes": 3, "reduce_zero_label": False, "scale": [64, 64]}),
    }
    path = tmp_path / f"dense{len(list(tmp_path.glob('dense*')))}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), meta)
    return path


def test_dense_build_args_are_checked_against_the_file_before_building(tmp_path):
    """A dense file's stored build_args rebuild its model: they may not name other weights to read, sizes are
    bounded, a builder that refuses them is one line, and a model larger than the file's weights is never built."""
    _, meta = rapidnet.load(_dense_file(tmp_path))
    assert meta["task"] == "segmentation" and meta["class_names"] == ["a", "b", "c"]
    cases = {
        "name other weights": {"backbone_checkpoint": "/etc/passwd"},
        "build no model": {"head_norm": "bogus"},
        "does not fit": {"fpn_channels": 4096},  # 4096 FPN channels: 600 MB per conv, the file holds 16
    }
    for expected, change in cases.items():
        result, grown = peak_memory_growth(lambda change=change: rapidnet.load(_dense_file(tmp_path, **change)))
        assert isinstance(result, CheckpointError) and expected in str(result), (change, result)
        assert "\n" not in str(result) and grown < 64 * MB, change
    with pytest.raises(CheckpointError, match="invalid 'eval_args' metadata"):
        path = _dense_file(tmp_path)
        data = dict(read_checkpoint(path)[1], eval_args=json.dumps({"scale": [40000, 40000]}))
        save_file(read_checkpoint(path)[0], str(path), data)
        rapidnet.load(path)


# ---- item 6: one line (exit 2), never a traceback ------------------------------------------------------------------

_BAD_METADATA = {
    "pretrained_cfg wrong types": {"pretrained_cfg": {"input_size": "abc", "crop_pct": "x", "mean": 3}},
    "crop_pct out of range": {"pretrained_cfg": {"crop_pct": -1}},
    "interpolation unknown": {"pretrained_cfg": {"interpolation": 5}},
    "mean of two channels": {"pretrained_cfg": {"mean": [0.5, 0.5]}},
    "class_names too few": {"class_names": ["cat"]},
    "class_names wrong types": {"class_names": [1, {"a": 2}, None]},
    "class_names with a newline": {"class_names": ["cat", "dog\nbird", "emu"]},
    "class_names too long": {"class_names": ["cat", "dog", "x" * 1000]},
    "pretrained_cfg a list": {"pretrained_cfg": [1, 2]},
    "pretrained_cfg not JSON": {"pretrained_cfg": "{'input_size'"},
    "pretrained_cfg nested too deep": {"pretrained_cfg": "[" * 5000 + "]" * 5000},
    "pretrained_cfg num_classes text": {"pretrained_cfg": {"num_classes": "abc"}},
    "task unknown": {"task": "poetry"},
}


@pytest.mark.parametrize("case", list(_BAD_METADATA))
def test_malformed_metadata_is_one_line_for_predict(tmp_path, capsys, case):
    path = micro_file(tmp_path, **_BAD_METADATA[case])
    code, _, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", path)
    assert code == 2 and err.count("\n") == 1 and "m.safetensors" in err, err
    assert "metadata" in err or "poetry" in err


def test_timm_class_count_of_the_wrong_type_or_size_is_one_line(tmp_path, capsys):
    """A timm peer's stored num_classes 'abc' (or a billion, which would build a classifier of 2 GB)."""
    import timm

    peer = timm.create_model("resnet10t", num_classes=2)
    for value in ("abc", str(10**9), "-3"):
        path = rapidnet.save_weights(peer, tmp_path / "peer.safetensors", {"num_classes": value})
        result, grown = peak_memory_growth(lambda path=path: rapidnet.load(path))
        assert isinstance(result, CheckpointError) and "'num_classes' metadata" in str(result), value
        assert grown < 64 * MB
    with pytest.raises(ConfigError, match=r"model\.num_classes"):
        load_config(overrides=["model.kwargs={num_classes: abc}"])


def test_a_tensor_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    model = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["stem.0.conv.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(sd, str(tmp_path / "shape.safetensors"), model_metadata(model))
    code, _, err = run_cli(capsys, "predict", SAMPLE, "--checkpoint", tmp_path / "shape.safetensors")
    assert code == 2 and err.count("\n") == 1 and "stem.0.conv.weight has shape (8, 3, 5, 5)" in err
    sd["stem.0.conv.weight"] = torch.zeros(8)  # too few dimensions to read an architecture off
    save_file(sd, str(tmp_path / "flat.safetensors"), model_metadata(model))
    with pytest.raises(CheckpointError, match="too few dimensions"):
        rapidnet.load(tmp_path / "flat.safetensors")
    torch.save({"model": sd | {"stem.0.conv.weight": torch.zeros(8, 3, 5, 5)}}, tmp_path / "shape.pth")
    target = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)  # a model of the user's own choosing
    with pytest.raises(CheckpointError, match=r"stem\.0\.conv\.weight has shape"):
        rapidnet.models.checkpoint.fit_state_dict(torch.load(tmp_path / "shape.pth")["model"], target, "shape.pth")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", SAMPLE, "--top-k", "-3"], "--top-k: -3 is out of range"),
        (["eval", "--checkpoint", "x.pt", "--crop-pct", "-1"], "--crop-pct: -1 is out of range"),
        (["eval", "--checkpoint", "x.pt", "--interpolation", "foo"], "invalid choice: 'foo'"),
        (["eval", "--checkpoint", "x.pt", "--input-size", "40000"], "--input-size: 40000 is out of range"),
        (["info", "rapidnet_ti", "--resolution", "50000"], "at most 4096"),
    ],
)
def test_out_of_range_numbers_are_refused_by_the_parser(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in last_line_error(err)


def test_bogus_model_kwargs_are_one_line(tmp_path, capsys, fm_root):
    """``--set 'model.kwargs={depths: bogus}'`` reached RapidNet's constructor and ended in a TypeError."""
    for kwargs, message in (
        ({"depths": "bogus"}, "depths must be a list"),
        ({"widths": [16, 24, 32]}, "one width per stage"),
        ({"widths": [16, 24, 32, 10**9]}, "each 2..16384"),
        ({"head_dim": "64"}, "head_dim must be an integer"),
        ({"depthz": [1]}, "takes no argument 'depthz'"),
    ):
        with pytest.raises(ConfigError, match=message):
            rapidnet.create_model("rapidnet_ti", **kwargs)
    code, _, err = run_cli(capsys, "train", "--data", fm_root, "--epochs", "1", "--output", tmp_path / "run",
                           "--set", "model.kwargs={depths: bogus}", "--no-ema", "--workers", "0")  # fmt: skip
    assert code == 2 and "depths must be a list of [IR, DC] block counts" in err and err.count("\n") == 1


def test_plot_of_a_log_with_non_numeric_values_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": "abc", "val_top1": 50.0}) + "\n")
    code, _, err = run_cli(capsys, "plot", run)
    assert code == 2 and "train_loss of epoch 1 is 'abc', not a number" in err and err.count("\n") == 1
    (run / "log.jsonl").write_text(json.dumps({"epoch": [1], "train_loss": 1.0}) + "\n")
    code, _, err = run_cli(capsys, "plot", run)
    assert code == 2 and "epoch" in err and err.count("\n") == 1
    (run / "log.jsonl").write_bytes(b"\xff\xfe\x00binary\n")
    code, _, err = run_cli(capsys, "plot", run)
    assert code == 2 and "cannot read log" in err and err.count("\n") == 1


def test_output_into_a_closed_pipe_ends_quietly():
    """``rapidnet info rapidnet_ti | head -1``: the reader is gone before the table is written."""
    cmd = [sys.executable, "-m", "rapidnet", "info", "rapidnet_ti"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # type: ignore[union-attr]
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=120) == 141
    assert err == "", err


def test_running_out_of_memory_is_one_line_as_a_last_resort(capsys, monkeypatch):
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise MemoryError

    monkeypatch.setattr("rapidnet.cli.info.variant_info", exhausted)
    code, _, err = run_cli(capsys, "info", "rapidnet_ti")
    assert code == 2 and "out of memory" in err and err.count("\n") == 1


# ---- item 7: accepted silently, or read wrong ----------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") saturates 16-bit values above 255: a gradient came out 99.6% white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb == 255).mean() < 0.01
    assert np.abs(rgb[..., 0].astype(float) - ramp / 257).max() <= 0.5 + 1e-9
    dark = np.full((8, 8), 1000, np.uint16)  # a dark 16-bit scan stays dark (the format's range, not the image's)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert np.asarray(load_rgb(tmp_path / "dark16.png")).max() == round(1000 / 257)
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(tmp_path / "f.tiff")
    assert np.asarray(load_rgb(tmp_path / "f.tiff")).max() == 255


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "data" / split / "cat" / "0.png")
    with pytest.raises(DataError, match="at least 2 classes"):
        build_dataset(tmp_path / "data", "train")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "data", "--epochs", "1", "--output", tmp_path / "r")
    assert code == 2 and "at least 2 classes" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "rapidnet_ti", "--num-classes", "-5"], "--num-classes: -5 is out of range"),
        (["eval", "--checkpoint", "x.pt", "--crop-pct", "0"], "--crop-pct: 0 is out of range"),
        (["predict", SAMPLE, "--top-k", "0"], "--top-k: 0 is out of range"),
    ],
)
def test_meaningless_numbers_are_refused(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in last_line_error(err)


def test_random_bytes_are_reported_as_not_a_checkpoint(tmp_path):
    """Random bytes are not "objects that could run code": they are not a checkpoint (or a truncated one)."""
    rng = np.random.default_rng(16)
    for i in range(5):
        path = tmp_path / f"random{i}.pt"
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert "could run code" not in str(info.value) and "not a PyTorch checkpoint" in str(info.value)


def test_dense_predict_of_a_bomb_png_and_timm_kwargs_it_does_not_take_are_one_line(tmp_path):
    """``det|seg predict`` read images with Pillow directly (a bomb was a traceback); a timm classifier given
    ``model.kwargs`` it does not take ended in a ``TypeError`` traceback."""
    from rapidnet.cli._dense import _read_image
    from rapidnet.config import ModelConfig
    from rapidnet.tasks.classification import create_classifier

    bomb = png_header(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(DataError, match="decompression bomb"):
        _read_image(str(bomb))
    with pytest.raises(ConfigError, match=r"fix model\.kwargs"):
        create_classifier(ModelConfig(name="resnet10t", kwargs={"no_such_argument": 1}), 10, False)


def test_plot_of_a_short_run_has_whole_epoch_ticks(tmp_path, monkeypatch):
    """Three epochs are plotted at epochs 1, 2, 3, not at 1.25, 1.5, ... (matplotlib's default for a short range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapidnet.cli.plot import plot_run

    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text(
        "".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_top1": 80.0 + e}) + "\n" for e in (1, 2, 3))
    )
    ticks: list[list[float]] = []
    close = plt.close

    def record_then_close(fig: Any = None) -> None:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks.append([t for t in ax.get_xticks() if lo <= t <= hi])
        close(fig)

    monkeypatch.setattr(plt, "close", record_then_close)
    plot_run(log, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert ticks and all(t and all(float(v).is_integer() for v in t) for t in ticks), ticks
