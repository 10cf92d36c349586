"""Deployment: export the fused RapidNet (ONNX, TorchScript, Core ML, OpenVINO IR, ExecuTorch), quantize it to int8
through each runtime's own quantizer (onnxruntime, NNCF for OpenVINO, pt2e + XNNPACKQuantizer for ExecuTorch), run
the files (:func:`load_runner`) and benchmark them.

:func:`optimize` (``rapidnet.deploy.cpu``) is the explicit eager-CPU inference pass; exports never take it.
``rapidnet.deploy.xnnpack`` holds the XNNPACK-only graph rewrites the ExecuTorch exporter applies.
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
    quantize_executorch,
    quantize_model,
    quantize_onnx,
    quantize_openvino,
)
from rapidnet.deploy.runtimes import Runner, load_runner, openvino_session

__all__ = [
    "FORMATS",
    "Agreement",
    "ArrayCalibrationReader",
    "ExportResult",
    "ImageCalibrationReader",
    "QuantizeReport",
    "Runner",
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
    "load_runner",
    "numpy_batches",
    "openvino_session",
    "optimize",
    "optimize_",
    "ort_session",
    "prepare_model",
    "preprocess_config",
    "quantize_executorch",
    "quantize_model",
    "quantize_onnx",
    "quantize_openvino",
    "read_metadata",
    "run_ort",
    "sample_inputs",
]
