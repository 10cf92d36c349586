"""``export``: the fused model to any runtime's file, checked against PyTorch in that runtime.

Every export starts from :func:`rapidnet.deploy.common.prepare_model` (the plain folded graph): deployment never
needs BatchNorm, layer scales or the distillation head, and the folded graph is the one that is fast. The exported
file is then loaded back through its runtime (:mod:`rapidnet.deploy.registry`) and run on a random input and on a
real photo (the bundled ankle boot through the model's eval transform), and its largest deviation from PyTorch is
reported. Runtimes that cannot run here (Core ML off macOS) check the saved file's interface instead and say so.

The metadata JSON (preprocessing, output names, the classifier's architecture, class names, a task model's
evaluation settings) goes into the file where its format has a slot, else into ``<file>.json`` beside it, so that
``predict``, ``eval`` and ``quantize`` can feed an exported file without the original checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from rapidnet.deploy import registry
from rapidnet.deploy.common import (
    Check,
    check_resolution,
    check_writable,
    compare_outputs,
    eval_transform,
    export_metadata,
    output_names,
    prepare_model,
    preprocess_config,
    torch_outputs,
)
from rapidnet.errors import ConfigError

DEFAULT_TOLERANCE = 1e-4
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "sample_ankle_boot.png"


def formats() -> dict[str, str]:
    """``{format: suffix}``: the runtimes ``export`` writes files for."""
    return {name: registry.get(name).suffix for name in registry.file_runtimes()}


def sample_inputs(config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two check inputs: seeded Gaussian noise of ``batch`` images, and the bundled photo through the eval transform."""
    _, h, w = config["input_size"]
    noise = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    image = eval_transform(config)(Image.open(SAMPLE_IMAGE).convert("RGB")).unsqueeze(0)
    return {"random": noise, "image": image.expand(batch, -1, -1, -1).contiguous()}


def verify_file(
    path: str | os.PathLike, model: nn.Module, inputs: Mapping[str, torch.Tensor], threads: int | None = None
) -> list[Check]:
    """Run the file through its runtime and the fused model through PyTorch on each input."""
    fused = prepare_model(model)
    runner = registry.for_path(path).load(path, threads)
    return [compare_outputs(k, runner(x), torch_outputs(fused, x), x.shape) for k, x in inputs.items()]


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it checked out."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    outputs: dict[str, tuple[int, ...]]
    seconds: float
    tolerance: float
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.passed(self.tolerance) for c in self.checks)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        shapes = ", ".join(f"{k} {list(v)}" for k, v in self.outputs.items())
        out = [f"wrote {self.path} ({self.format}, {self.seconds:.1f} s): input {list(self.input_shape)} -> {shapes}"]
        for c in self.checks:
            verdict = "ok" if c.passed(self.tolerance) else "MISMATCH"
            out.append(
                f"  {c.name:6s} input {list(c.input_shape)}: max |{self.format} - pytorch| = {c.max_abs_diff:.3g} "
                f"(outputs up to {c.max_abs_ref:.3g}; allclose rtol=atol={self.tolerance:g}: {verdict})"
            )
        out += [f"  spec problem: {p}" for p in self.problems]
        if self.note:
            out.append(f"  {self.note}")
        return out


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    resolution: Sequence[int] | None = None,
    dynamic_batch: bool = False,
    fp16: bool = False,
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = 1,
    metadata: Mapping[str, Any] | None = None,
    batch_size: int = 1,
) -> ExportResult:
    """Export the fused ``model`` for the runtime ``format`` and check it (see the module docstring).

    ``resolution`` defaults to the model's ``pretrained_cfg`` input size. The random check input has batch 3 when
    ``dynamic_batch`` is set, so the symbolic batch is exercised too. A check passes when
    ``allclose(exported, pytorch, rtol=tolerance, atol=tolerance)`` (see :class:`~rapidnet.deploy.common.Check`).
    ``threads`` is the runtime's for the check: one by default, as a check needs no speed and spinning worker
    threads on a busy machine can make a small model hundreds of times slower. ``metadata`` adds fields to the
    file's metadata (class names).
    """
    runtime = registry.get(format)
    if runtime.suffix is None:
        raise ConfigError(f"{format!r} has no file format: choose one of {', '.join(registry.file_runtimes())}")
    options = {"fp16": fp16, "opset": opset}
    for name, value in options.items():
        if value and name not in runtime.export_options:
            takers = [n for n in registry.file_runtimes() if name in registry.get(n).export_options]
            raise ConfigError(f"--{name} applies to --format {' or '.join(takers)} only: drop it for {runtime.name}")
    options = {k: v for k, v in options.items() if v}
    runtime.require(f"{runtime.title} export")
    fused = prepare_model(model)
    config = preprocess_config(fused, resolution)
    hw = check_resolution(tuple(config["input_size"][1:]))
    path = check_writable(runtime.check_suffix(path))
    inputs = sample_inputs(config, batch=3 if dynamic_batch else batch_size)
    ref = torch_outputs(fused, inputs["image"][:1])
    outputs = {n: tuple(r.shape) for n, r in zip(output_names(fused), ref, strict=True)}
    start = time.perf_counter()
    runtime.export(
        fused,
        path,
        hw,
        batch_size=batch_size,
        dynamic_batch=dynamic_batch,
        metadata=export_metadata(fused, config, metadata),
        **options,
    )
    seconds = time.perf_counter() - start
    checks: list[Check] = []
    problems: list[str] = []
    note = ""
    if verify and runtime.runs_here:
        runner = runtime.load(path, threads)
        checks = [compare_outputs(k, runner(x), torch_outputs(fused, x), x.shape) for k, x in inputs.items()]
    elif verify:
        problems = runtime.spec_problems(path, (1, 3, *hw), outputs)
        note = runtime.note
    else:
        note = "not verified (--no-verify)"
    return ExportResult(path, runtime.name, (1, 3, *hw), outputs, seconds, tolerance, checks, problems, note)
