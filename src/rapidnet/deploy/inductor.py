"""TorchInductor on the CPU: ``torch.compile`` of the plain folded model in this process (``torch-compile``), and
AOTInductor packages (``aoti``, ``.pt2``): the same compiler run ahead of time into a shared library that
``torch._inductor.aoti_load_package`` (or LibTorch's ``AOTIModelPackageLoader`` from C++) runs without Python.

Both start from :func:`~rapidnet.deploy.common.prepare_model` (the plain folded model: Inductor makes its own
oneDNN calls) and compile with ``freezing``, which folds the weights into the graph as constants and lets Inductor
prepack them for oneDNN and fuse conv + GELU and conv + residual add into single oneDNN calls. Freezing happens only
with autograd off (Inductor checks ``torch.is_grad_enabled()``) and, for ``torch.compile``, only when it is set
while Dynamo traces; without it Inductor runs the plain aten convolutions, no faster than eager PyTorch. A
frozen model no longer reads its parameters: it runs the weights it was compiled with.

Packages are compiled for this machine's instruction set (``-march=native``; AOTI stores it as ``AOTI_CPU_ISA``), so
export on the kind of CPU that will run them. Inductor's own kernels are compiled with ``cpp.dynamic_threads`` so a
package follows the thread count of the process that runs it rather than the one that compiled it. The metadata JSON
is stored in the package (AOTI's ``aot_inductor.metadata``, key ``rapidnet``), next to AOTI's own keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rapidnet.deploy.common import (
    METADATA_KEY,
    Runner,
    Runtime,
    check_batch,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    one_line,
    prepare_model,
    quiet_logs,
    replace_into,
)
from rapidnet.errors import CheckpointError, ConfigError

COMPILE_MODE: str | None = None  # Inductor's default: max-autotune only autotunes the classifier's GEMM on the CPU
BATCH_KEY = "rapidnet_batch"  # AOTI metadata: the batch size a package was exported for, "dynamic" for any
_AOTI_DIR = "data/aotinductor/"  # where a .pt2 archive keeps AOTInductor's compiled models


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _has_aoti() -> bool:
    import torch._inductor

    return hasattr(torch._inductor, "aoti_compile_and_package")


@contextlib.contextmanager
def _quiet_compile() -> Iterator[None]:
    """Hold export's and Inductor's chatter, and cpp_extension's misleading "No CUDA runtime is found" (printed
    when a CPU build looks for a compiler), unless logging is at DEBUG."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        cpp_extension.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_logs(("torch.export", "torch._inductor", "torch._dynamo")):
            warnings.simplefilter("ignore")
            yield
    finally:
        cpp_extension.setLevel(level)


def _check_inductor() -> None:
    if not _has_aoti():
        raise ConfigError(f"AOTInductor packages need torch >= 2.6, this is {torch.__version__}: pip install -U torch")


# ---- torch.compile -------------------------------------------------------------------------------------------------


class CompiledForCpu(nn.Module):
    """The plain folded model compiled by Inductor (with freezing) for fp32 CPU inference.

    Calls run under ``torch.inference_mode()`` and ``torch._inductor.config.patch(freezing=True)``: freezing must be
    on while Dynamo traces (``torch.compile(options={"freezing": True})`` reaches Inductor only after Dynamo has
    lifted the weights to graph inputs, and nothing gets frozen), and any call may compile. The patch changes a
    process-wide setting for the call, so do not compile other models in other threads meanwhile. The first call
    with a new input shape compiles (seconds); with ``dynamic=False`` each shape gets its own, fastest, code.
    With ``batch_size`` set, smaller batches are padded with zeros to that size and the outputs cut back, so the
    last, short batch of an evaluation reuses the code compiled for the full ones (eval-mode networks treat each
    sample on its own, so the padding changes no output).
    ``module`` is the folded copy that was compiled; changing its weights changes nothing (they were frozen in).
    """

    def __init__(self, module: nn.Module, compiled: Callable[..., Any], batch_size: int | None = None) -> None:
        super().__init__()
        self.module = module
        self.batch_size = batch_size
        object.__setattr__(self, "compiled", compiled)  # not a submodule: it holds ``module``'s parameters again
        self.eval()

    @property
    def plain_module(self) -> nn.Module:
        """The folded module that was compiled (what an exporter takes instead of this wrapper)."""
        return self.module

    def forward(self, x: torch.Tensor) -> Any:
        from torch._inductor import config

        short = self.batch_size is not None and x.shape[0] < self.batch_size
        if short:
            n = x.shape[0]
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        with config.patch(freezing=True), torch.inference_mode():
            out = self.compiled(x)
        if short:
            out = out[:n] if isinstance(out, torch.Tensor) else type(out)(o[:n] for o in out)
        return out


def compile_for_cpu(
    model: nn.Module, *, mode: str | None = COMPILE_MODE, dynamic: bool = False, batch_size: int | None = None
) -> CompiledForCpu:
    """``torch.compile`` (Inductor, freezing) of the plain folded copy of ``model``: the fast form for fp32 CPU
    inference in this process (measured against eager in ``docs/performance.md``).

    Compilation happens on the first call of each input shape; ``model`` itself is untouched. Give ``batch_size``
    when batches of up to that size will come (an evaluation loop): short ones are padded, so one compile serves all.
    """
    plain = prepare_model(model)
    return CompiledForCpu(
        plain, torch.compile(plain, backend="inductor", mode=mode, dynamic=dynamic), batch_size=batch_size
    )


class TorchCompile(Runtime):
    """The benchmark's ``torch-compile`` backend: :func:`compile_for_cpu`, compiled by its first (untimed) call."""

    name = "torch-compile"
    title = "torch.compile (inductor)"

    def available(self) -> bool:
        return hasattr(torch, "compile")

    def bench_runner(
        self, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool = False
    ) -> Callable[[], Any]:
        if int8:
            raise ConfigError(f"{self.title} has no int8 quantizer here: choose one of the runtimes that has")
        torch.set_num_threads(threads)  # Inductor's kernels are specialised for the thread count they compile at
        compiled = compile_for_cpu(model)
        with _quiet_compile():
            compiled(x)
        return lambda: compiled(x)


# ---- AOTInductor ---------------------------------------------------------------------------------------------------


def _aoti_members(path: Path) -> list[str]:
    """The archive's member names; a missing file or one that is not an AOTInductor package is a one-line error."""
    if not path.is_file():
        raise CheckpointError(f"AOTInductor package not found: {path}: check the path")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not an AOTInductor .pt2 package ({one_line(e)[:120]})") from None
    if not any(_AOTI_DIR in name for name in names):
        raise CheckpointError(f"{path} is not an AOTInductor .pt2 package (no compiled model inside): re-export it")
    return names


def _package_metadata(path: Path) -> dict[str, str]:
    """AOTI's metadata of the package's model (ours under ``rapidnet``), read from the archive without loading the
    compiled library; ``{}`` for packages that do not carry it."""
    names = _aoti_members(path)
    found = [n for n in names if _AOTI_DIR + "model/" in n and n.endswith("wrapper_metadata.json")]
    if not found:
        return {}
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(found[0])
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _fixed_batch(aoti_meta: dict[str, str]) -> int | None:
    batch = aoti_meta.get(BATCH_KEY, "dynamic")
    return int(batch) if str(batch).isdigit() else None


def export_aoti(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    metadata: str | None = None,
) -> Path:
    """Write an AOTInductor ``.pt2`` package of the plain folded ``model``: ``torch.export`` (a symbolic batch with
    ``dynamic_batch``), then ``aoti_compile_and_package`` with freezing, the metadata JSON inside."""
    _check_inductor()
    h, w = check_resolution(resolution)
    check_batch(batch_size)
    path = Path(path)
    if path.suffix.lower() != ".pt2":
        raise ConfigError(f"AOTInductor output {path} must end in .pt2")
    path = check_writable(path)
    fused = prepare_model(model)
    meta = metadata_json(fused, (h, w), metadata)
    # a batch of 1 would be specialised by torch.export: trace a dynamic batch at 2
    example = torch.zeros(max(batch_size, 2) if dynamic_batch else batch_size, 3, h, w)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    configs = {
        "freezing": True,
        "cpp.dynamic_threads": True,
        "aot_inductor.metadata": {METADATA_KEY: meta, BATCH_KEY: "dynamic" if dynamic_batch else str(batch_size)},
    }

    def save(tmp: Path) -> None:
        with _quiet_compile(), torch.no_grad():
            program = torch.export.export(fused, (example,), dynamic_shapes=dynamic_shapes)
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)

    try:
        return replace_into(path, save)
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # the C++ compiler is missing or failed: say so in one line, not a page of build log
        raise ConfigError(f"AOTInductor could not compile {path.name} ({one_line(e)[:200]})") from None


def load_aoti(path: str | os.PathLike) -> tuple[Callable[..., Any], dict[str, str]]:
    """The loaded package (called with tensors, returns tensors) and AOTI's metadata of it."""
    _check_inductor()
    path = Path(path)
    _aoti_members(path)
    try:
        with _quiet_compile():
            compiled = torch._inductor.aoti_load_package(str(path))
        aoti_meta = dict(compiled.get_metadata())
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot load the AOTInductor package {path} ({one_line(e)[:160]})") from None
    return compiled, aoti_meta


class AOTInductor(Runtime):
    """AOTInductor ``.pt2`` packages: fixed or dynamic batch (``dynamic_batch``); metadata inside the package.

    A package made for one batch size ran faster than a dynamic-batch one here (its kernels are specialised to the
    shape), so the benchmark exports for its batch; a fixed-batch package still takes any batch through
    :class:`~rapidnet.deploy.common.Runner`, chunk by chunk.
    """

    name = "aoti"
    title = "AOTInductor"
    suffix = ".pt2"
    fixed_batch = False

    def available(self) -> bool:
        return _has_aoti()

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
        return export_aoti(
            model, path, resolution, batch_size=batch_size, dynamic_batch=dynamic_batch, metadata=metadata
        )

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        """Runs in this process's torch: ``threads`` sets torch's intra-op thread count, which is process-wide (it
        sizes oneDNN's convolutions and, through ``cpp.dynamic_threads``, the package's own kernels)."""
        path = self.check_suffix(path, "file")
        compiled, aoti_meta = load_aoti(path)
        if threads is not None:
            torch.set_num_threads(threads)

        def run(x: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                out = compiled(torch.from_numpy(x))
            return [o.numpy() for o in _outputs(out)]

        meta = decode_metadata(aoti_meta.get(METADATA_KEY), path)
        return Runner(path, self.name, _fixed_batch(aoti_meta), run, meta)

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        path = self.check_suffix(path, "file")
        return decode_metadata(_package_metadata(path).get(METADATA_KEY), path)
