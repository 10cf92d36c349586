"""Which runtimes exist: their names, file suffixes, old aliases and the bench's backend names, as plain data.

This module imports nothing, so the ``--format``, ``--runtime`` and ``--backends`` options of ``rapidnet export``,
``quantize`` and ``bench`` list them without loading torch. :mod:`rapidnet.deploy.registry` maps each name to its
module and re-exports these functions; code that runs a runtime goes through the registry.
"""

from __future__ import annotations

# name -> (module, class, file suffix or None). The order is the benchmark's and the help text's.
RUNTIMES: dict[str, tuple[str, str, str | None]] = {
    "torch": ("rapidnet.deploy.eager", "EagerTorch", None),
    "torch-cl": ("rapidnet.deploy.eager", "EagerTorchChannelsLast", None),
    "torch-compile": ("rapidnet.deploy.inductor", "TorchCompile", None),
    "onnx": ("rapidnet.deploy.onnx", "OnnxRuntime", ".onnx"),
    "openvino": ("rapidnet.deploy.openvino", "OpenVINO", ".xml"),
    "executorch": ("rapidnet.deploy.executorch", "ExecuTorch", ".pte"),
    "litert": ("rapidnet.deploy.litert", "LiteRT", ".tflite"),
    "coreml": ("rapidnet.deploy.coreml", "CoreML", ".mlpackage"),
    "torchscript": ("rapidnet.deploy.torchscript", "TorchScript", ".pt"),
    "aoti": ("rapidnet.deploy.inductor", "AOTInductor", ".pt2"),
    "cuda": ("rapidnet.deploy.eager", "EagerCuda", None),
}
# The runtimes with an int8 quantizer (each module's Runtime.quantizer says which; a test holds the two together).
QUANTIZING = ("onnx", "openvino", "executorch", "litert")
# Names the runtimes had before they had one each; accepted and mapped, never printed.
ALIASES: dict[str, str] = {"onnxruntime": "onnx", "ort": "onnx", "ort-fp32": "onnx", "tflite": "litert"}
INT8 = "-int8"


def names() -> list[str]:
    return list(RUNTIMES)


def file_runtimes() -> list[str]:
    """The runtimes with a file format: what ``rapidnet export --format`` takes."""
    return [n for n, (_, _, suffix) in RUNTIMES.items() if suffix is not None]


def quantizing() -> list[str]:
    """The runtimes ``rapidnet quantize`` makes int8 files for."""
    return list(QUANTIZING)


def suffixes() -> dict[str, str]:
    """``{".onnx": "onnx", ...}``: which runtime runs a file."""
    return {suffix: n for n, (_, _, suffix) in RUNTIMES.items() if suffix is not None}


def unalias(name: str) -> str:
    """An old name mapped to the one name (argparse ``type=``: ``choices`` then says what is known)."""
    return ALIASES.get(name, name)


def backend_names() -> list[str]:
    """Every backend name the benchmark knows (whether or not its package is installed here)."""
    out: list[str] = []
    for name in RUNTIMES:
        if name in ("coreml",):  # Core ML runs on Apple hardware only
            continue
        out.append(name)
        if name in QUANTIZING:
            out.append(name + INT8)
    return out
