"""OpenVINO: IR files (``.xml`` graph + ``.bin`` weights) converted from the fused model, run by OpenVINO's CPU
plugin at float32 precision, int8 through NNCF's post-training quantization (FakeQuantize nodes, which the CPU
plugin runs as int8 kernels).

Weights stay float32 in the file (``save_model`` would compress them to float16 by default: 1e-3 off on logits);
the input is named ``input``, the outputs as in the other formats, and the metadata JSON is the IR's ``rt_info``
entry ``rapidnet``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rapidnet.deploy.common import (
    INPUT_NAME,
    METADATA_KEY,
    Runner,
    Runtime,
    check_batch,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    one_line,
    output_names,
    prepare_model,
    quiet_logs,
    rebatch,
    require,
)
from rapidnet.errors import CheckpointError, ConfigError, DataError

PRESETS = ("performance", "mixed")


def import_openvino() -> Any:
    require("openvino", "OpenVINO")
    import openvino as ov

    return ov


def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    dynamic_batch: bool = False,
    metadata: str | Mapping[str, Any] | None = None,
    batch_size: int = 1,
) -> Path:
    """Write the fused ``model`` as OpenVINO IR: ``path`` (``.xml``) and the ``.bin`` beside it, both written to
    temporary names and renamed."""
    ov = import_openvino()
    h, w = check_resolution(resolution)
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"OpenVINO output {path} must end in .xml (the weights go to {path.stem}.bin beside it)")
    check_batch(batch_size)
    path = check_writable(path)
    fused = prepare_model(model)
    example = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(
            fused, example_input=example, input=[ov.PartialShape([-1 if dynamic_batch else batch_size, 3, h, w])]
        )
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for port, name in zip(ov_model.outputs, output_names(fused), strict=True):
        port.get_tensor().set_names({name})
    ov_model.set_rt_info(metadata_json(fused, (h, w), metadata), METADATA_KEY)
    return save_openvino(ov_model, path)


def save_openvino(ov_model: Any, path: Path) -> Path:
    """Save an OpenVINO model as ``path`` (.xml) + .bin, float32 weights, both written to temporary names first."""
    ov = import_openvino()
    weights = path.with_suffix(".bin")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.xml")
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), weights)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot write {path} ({one_line(e)[:120]}): choose a writable output path") from None
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return path


def _check_files(path: Path) -> None:
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"OpenVINO model not found: {path} (and {path.stem}.bin beside it): check the path")


def openvino_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """OpenVINO's CPU plugin compiled for ``path`` (``.xml``) at float32 precision with ``threads`` threads."""
    ov = import_openvino()
    path = Path(path)
    _check_files(path)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 on AMX CPUs otherwise: 1e-2 off
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as e:
        raise CheckpointError(f"OpenVINO cannot load {path} ({one_line(e)[:160]})") from None


def run_openvino(compiled: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    result = compiled(np.ascontiguousarray(arr, dtype=np.float32))
    return [np.asarray(result[port]) for port in compiled.outputs]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON in an IR's ``rt_info`` (``{}`` for IRs made elsewhere)."""
    ov = import_openvino()
    path = Path(path)
    _check_files(path)
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as e:
        raise CheckpointError(f"OpenVINO cannot read {path} ({one_line(e)[:160]})") from None
    return decode_metadata(
        model.get_rt_info(METADATA_KEY).astype(str) if model.has_rt_info(METADATA_KEY) else None, path
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """NNCF draws its own rich progress bars on stdout; ``rapidnet quantize --json`` must print only JSON."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def quantize_openvino(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration: Sequence[np.ndarray | torch.Tensor],
    subset_size: int = 300,
    preset: str = "performance",
) -> Path:
    """NNCF post-training quantization of an OpenVINO IR: int8 weights (per channel, symmetric) and activations
    (per tensor), with NNCF's fast bias correction, calibrated on ``calibration`` batches.

    ``preset="mixed"`` makes activations asymmetric (for inputs that are not centred on zero). The metadata the
    fp32 IR carries is kept; weights are stored without float16 compression.
    """
    require("nncf", "OpenVINO int8 quantization")
    ov = import_openvino()
    import nncf

    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if preset not in presets:
        raise ConfigError(f"unknown NNCF preset {preset!r}: choose {', '.join(presets)}")
    int8_path = Path(int8_path)
    if int8_path.suffix != ".xml":
        raise ConfigError(f"OpenVINO int8 output {int8_path} must end in .xml (the weights go to .bin beside it)")
    int8_path = check_writable(int8_path)
    model = ov.Core().read_model(str(fp32_path))
    items = [np.ascontiguousarray(b.numpy() if isinstance(b, torch.Tensor) else b, np.float32) for b in calibration]
    if not items:
        raise DataError("calibration produced no images: check the calibration data")
    with quiet_logs(("nncf",)), warnings.catch_warnings(), _no_progress_bars():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            model, nncf.Dataset(items), preset=presets[preset], subset_size=min(subset_size, len(items))
        )
    if model.has_rt_info(METADATA_KEY):
        quantized.set_rt_info(model.get_rt_info(METADATA_KEY).astype(str), METADATA_KEY)
    return save_openvino(quantized, int8_path)


class OpenVINO(Runtime):
    name = "openvino"
    title = "OpenVINO"
    suffix = ".xml"
    packages = ("openvino",)
    quantizer = "NNCF post-training quantization"
    quantize_options = frozenset({"preset"})

    def files(self, path: str | os.PathLike) -> list[Path]:
        return [Path(path), Path(path).with_suffix(".bin")]

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        resolution: Sequence[int],
        *,
        batch_size: int = 1,
        dynamic_batch: bool = False,
        metadata: str | None = None,
    ) -> Path:
        return export_openvino(model, path, resolution, dynamic_batch, metadata, batch_size)

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        compiled = openvino_session(path, threads)
        batch = compiled.inputs[0].get_partial_shape()[0]
        fixed = batch.get_length() if batch.is_static else None
        return Runner(Path(path), self.name, fixed, lambda x: run_openvino(compiled, x), read_metadata(path))

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        return read_metadata(path)

    def input_shape(self, path: str | os.PathLike) -> list[Any]:
        ov = import_openvino()
        _check_files(Path(path))
        shape = ov.Core().read_model(str(path)).inputs[0].get_partial_shape()
        return [d.get_length() if d.is_static else -1 for d in shape]

    def quantize(
        self,
        model: nn.Module | None,
        fp32_path: Path,
        int8_path: Path,
        calibration: Sequence[np.ndarray],
        preset: str = "performance",
        **_: Any,
    ) -> Path:
        require("nncf", "OpenVINO int8 quantization")
        batch = self.input_shape(fp32_path)[0]
        items = rebatch(calibration, batch) if batch > 0 else list(calibration)
        return quantize_openvino(fp32_path, int8_path, items, subset_size=len(items), preset=preset)

    def quantization_facts(self, preset: str = "performance", **_: Any) -> dict[str, Any]:
        import nncf
        import openvino

        return {
            "runtime": f"openvino {openvino.__version__}, nncf {nncf.__version__}",
            "format": "NNCF FakeQuantize IR",
            "weights": "int8 per-channel symmetric",
            "activations": "int8 per-tensor " + ("symmetric" if preset == "performance" else "asymmetric"),
            "preset": preset,
            "method": "minmax + fast bias correction",
        }

    def matmul_probe(self, b: np.ndarray, threads: int, workdir: Path) -> tuple[str, Any]:
        ov = import_openvino()
        from openvino import opset13 as ops

        x = ops.parameter(list(b.shape), ov.Type.f32)
        model = ov.Model([ops.matmul(x, ops.constant(b), False, False)], [x])
        compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        )
        return f"OpenVINO {ov.__version__} MatMul (oneDNN)", lambda x: compiled(x)
