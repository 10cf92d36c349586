"""Core ML: an ML Program (``.mlpackage``, iOS 16 / macOS 13 or newer) converted from the traced fused model.

coremltools cannot run predictions off macOS, so on Linux an export is checked by its package spec (input and output
names and shapes, :func:`coreml_spec_problems`) and numerical checks are left to a Mac.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from rapidnet.deploy.common import (
    INPUT_NAME,
    METADATA_KEY,
    Runtime,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    one_line,
    output_names,
    prepare_model,
    preprocess_config,
    quiet_logs,
    replace_into,
)
from rapidnet.deploy.torchscript import trace
from rapidnet.errors import ConfigError

NOTE = (
    "Core ML: package spec (input/output names and shapes) checked; numerical checks need macOS "
    "(coremltools cannot run predictions on Linux)"
)


def import_coremltools() -> Any:
    """Import coremltools without its Linux-only noise (missing native runtime, untested torch version)."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError as e:
        raise ConfigError(f"Core ML export needs coremltools ({one_line(e)}): pip install 'rapidnet[deploy]'") from None
    finally:
        ct_logger.setLevel(level)
    return ct


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    fp16: bool = False,
    dynamic_batch: bool = False,
    metadata: str | Mapping[str, Any] | None = None,
) -> Path:
    """Convert the traced fused model to a Core ML ML Program.

    Inputs and outputs stay float32 for the caller; ``fp16`` makes the computation half precision (what the Apple
    Neural Engine runs). With ``dynamic_batch`` the batch may range over 1..64.
    """
    ct = import_coremltools()
    h, w = check_resolution(resolution)
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"Core ML output {path} must end in .mlpackage")
    path = check_writable(path)
    fused = prepare_model(model)
    traced = trace(fused, (h, w))
    batch: Any = ct.RangeDim(1, 64, default=1) if dynamic_batch else 1
    inputs = [ct.TensorType(name=INPUT_NAME, shape=(batch, 3, h, w), dtype=np.float32)]
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in output_names(fused)]
    precision = ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), quiet_logs():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            compute_precision=precision,
            minimum_deployment_target=ct.target.iOS16,
        )
    config = preprocess_config(fused, (h, w))
    mlmodel.short_description = "RapidNet (reparameterized) exported by rapidnet"
    mlmodel.user_defined_metadata[METADATA_KEY] = metadata_json(fused, (h, w), metadata)
    mlmodel.input_description[INPUT_NAME] = (
        f"float32 (N, 3, {h}, {w}) RGB scaled to [0, 1], then normalised with "
        f"mean {list(config['mean'])}, std {list(config['std'])}"
    )
    return replace_into(path, lambda tmp: mlmodel.save(str(tmp)))


def coreml_spec_problems(
    path: str | os.PathLike, input_shape: Sequence[int], outputs: Mapping[str, Sequence[int]]
) -> list[str]:
    """What is wrong with a saved ``.mlpackage``'s interface: input name/shape, output names/shapes ([] if right)."""
    ct = import_coremltools()
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:
        return [f"cannot read the package spec ({one_line(e)[:120]})"]
    problems: list[str] = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')}, not mlProgram")
    ins = list(spec.description.input)
    if [i.name for i in ins] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in ins]}, expected [{INPUT_NAME!r}]")
    else:
        arr = ins[0].type.multiArrayType
        shape = list(arr.shape)
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        if ranges:  # flexible batch: the default shape is batch 1; check the fixed dims via the ranges
            shape = [lo if lo == hi else shape[i] for i, (lo, hi) in enumerate(ranges)]
        if shape != list(input_shape):
            problems.append(f"input shape is {shape}, expected {list(input_shape)}")
    outs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    if list(outs) != list(outputs):
        problems.append(f"outputs are {list(outs)}, expected {list(outputs)}")
    else:
        for name, want in outputs.items():
            if outs[name] and outs[name] != list(want):
                problems.append(f"output {name} has shape {outs[name]}, expected {list(want)}")
    return problems


class CoreML(Runtime):
    name = "coreml"
    title = "Core ML"
    suffix = ".mlpackage"
    packages = ("coremltools",)
    runs_here = False
    export_options: ClassVar[frozenset[str]] = frozenset({"fp16"})
    note = NOTE

    def spec_problems(
        self, path: str | os.PathLike, input_shape: Sequence[int], outputs: Mapping[str, Sequence[int]]
    ) -> list[str]:
        return coreml_spec_problems(path, input_shape, outputs)

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        resolution: Sequence[int],
        *,
        batch_size: int = 1,
        dynamic_batch: bool = False,
        metadata: str | None = None,
        fp16: bool = False,
    ) -> Path:
        return export_coreml(model, path, resolution, fp16=fp16, dynamic_batch=dynamic_batch, metadata=metadata)

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        ct = import_coremltools()
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as e:
            raise ConfigError(f"cannot read the Core ML package {path} ({one_line(e)[:120]})") from None
        return decode_metadata(spec.description.metadata.userDefined.get(METADATA_KEY), path)
