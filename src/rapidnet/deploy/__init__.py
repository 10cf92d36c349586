"""Deployment: export the fused RapidNet (ONNX, TorchScript, Core ML, OpenVINO IR, ExecuTorch) and quantize it to int8
for onnxruntime.

``ort_session`` and ``export_onnx`` are the building blocks the benchmark uses for its onnxruntime runs.
:func:`optimize` (``rapidnet.deploy.cpu``) is the explicit eager-CPU inference pass; exports never take it.
"""

from rapidnet.deploy.cpu import deoptimize_, optimize, optimize_
from rapidnet.deploy.export import (
    FORMATS,
    ExportResult,
    check_resolution,
    eval_transform,
    export,
    export_coreml,
    export_executorch,
    export_onnx,
    export_openvino,
    export_torchscript,
    ort_session,
    prepare_model,
    preprocess_config,
    read_metadata,
    run_ort,
    sample_inputs,
)
from rapidnet.deploy.quantize import (
    Agreement,
    ArrayCalibrationReader,
    ImageCalibrationReader,
    QuantizeReport,
    calibration_dataset,
    compare_accuracy,
    numpy_batches,
    quantize_model,
    quantize_onnx,
)

__all__ = [
    "FORMATS",
    "Agreement",
    "ArrayCalibrationReader",
    "ExportResult",
    "ImageCalibrationReader",
    "QuantizeReport",
    "calibration_dataset",
    "check_resolution",
    "compare_accuracy",
    "deoptimize_",
    "eval_transform",
    "export",
    "export_coreml",
    "export_executorch",
    "export_onnx",
    "export_openvino",
    "export_torchscript",
    "numpy_batches",
    "optimize",
    "optimize_",
    "ort_session",
    "prepare_model",
    "preprocess_config",
    "quantize_model",
    "quantize_onnx",
    "read_metadata",
    "run_ort",
    "sample_inputs",
]
