"""Small helpers below every other layer: safe checkpoint reading, atomic file writing, model unwrapping, subsets,
what this CPU's instruction set can do fast.

Nothing here imports another part of rapidnet except :mod:`rapidnet.errors`, so ``config``, ``data``, ``engine``,
``models``, ``tasks`` and ``deploy`` can all use it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import platform
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.runtimes import suffixes
from rapidnet.scratch import pid_alive

__all__ = [
    "atomic_write",
    "cpu_flags",
    "cpu_has_bfloat16",
    "cpu_int8_saturates",
    "cpu_model",
    "jsonable",
    "read_checkpoint",
    "refuse_overwriting_input",
    "remove_stale_temp_files",
    "subset_indices",
    "temp_path",
    "unwrap_model",
    "write_error",
]


# ---- files ---------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """Load a checkpoint file safely; returns ``(object, safetensors_metadata)``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}: check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder: pass the file inside it (e.g. last.pt or model.safetensors)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    with open(path, "rb") as f:
        head = f.read(16)
    exported = exported_format(path, head)
    if exported is not None:
        raise CheckpointError(
            f"{path} is an exported {exported} model, not a checkpoint of weights: run it with rapidnet predict or "
            "eval --checkpoint; here, pass the checkpoint it was exported from"
        )
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):  # a class or function by name: it could run code
            raise CheckpointError(
                f"{path} holds Python objects that safe loading refuses (they could run code): "
                "re-save just the state_dict with torch.save(model.state_dict(), ...)"
            ) from None
        detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0])[:120]
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({detail}): re-download it") from None
    except Exception as e:  # a cut file fails in many ways: zip, unpickler (KeyError), EOF, ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({detail[:120]}): re-download or re-export it"
        ) from None
    return obj, {}


def exported_format(path: Path, head: bytes) -> str | None:
    """The runtime whose file ``path`` is (by suffix, or by its first bytes: XML, a TFLite flatbuffer, a TorchScript
    archive), or None for anything else: so that a model file given as weights is named as what it is."""
    runtime = suffixes().get(path.suffix.lower())
    if runtime is not None and runtime != "torchscript":
        return runtime
    if head.lstrip().startswith((b"<?xml", b"<net")):
        return "openvino"
    if head[4:8] == b"TFL3":
        return "litert"
    if head.startswith(b"PK"):  # a zip: torch.save's and TorchScript's archives; only TorchScript holds code/
        try:
            with zipfile.ZipFile(path) as archive:
                if any("/code/" in name for name in archive.namelist()[:10_000]):
                    return "torchscript"
        except (OSError, zipfile.BadZipFile):
            return None
    return None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({detail[:120]})") from None
    return tensors, metadata


#: the temporary name :func:`atomic_write` writes to: ``.NAME.tmpPID`` beside ``NAME``
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>[0-9]+)$")

#: errno -> (what happened to the folder, the fix); other OSErrors keep the generic message
_DISK_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk holding {folder} is full", "free space there or choose an output folder on another disk"),
    errno.EDQUOT: ("your disk quota on {folder} is used up", "free space there or choose another output folder"),
    errno.EROFS: ("{folder} is on a read-only file system", "choose a writable output folder"),
    errno.EACCES: ("permission denied in {folder}", "choose an output folder you can write to"),
    errno.EPERM: ("permission denied in {folder}", "choose an output folder you can write to"),
    errno.EFBIG: ("the file is larger than {folder} (or `ulimit -f`) allows", "choose another output folder"),
}
#: how Rust writers (safetensors) report an OS error inside their own exception type
_OS_ERROR_TEXT = re.compile(r"os error ([0-9]+)")
#: what torch's zip writer (a RuntimeError) and safetensors (their own error) say when the disk fills up mid-write
_FULL_DISK_TEXT = (
    "unexpected pos",
    "file write failed",
    "no space left",
    "storagefull",
    "quota exceeded",
    "iostream error",  # OpenVINO's serializer, which reports a full disk only through the C++ stream's failure
)


def temp_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: a hidden ``.NAME.tmpPID`` beside it (same file system, so
    the final rename is atomic; the PID tells a stale file of a killed process from one being written)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _free_space(folder: Path) -> str:
    """``" (now 12.3 MB free)"`` for the file system holding ``folder`` (or its nearest existing parent), else ``""``
    (measured after the partial file was removed, so it tells how far the disk was from holding the file)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                free = float(shutil.disk_usage(candidate).free)
            except OSError:
                return ""
            unit = "bytes"
            for unit in ("bytes", "kB", "MB", "GB", "TB"):
                if free < 1000 or unit == "TB":
                    break
                free /= 1000
            return f" (now {free:.0f} bytes free)" if unit == "bytes" else f" (now {free:.1f} {unit} free)"
    return ""


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (so nothing can be created under it), if any."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder that exists or can be created: refused in one line when it, or a folder above it, is a
    file (mkdir would say only "File exists" or "Not a directory")."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder: choose a folder")
    blocker = file_in_the_way(path)
    if blocker is not None:
        raise ConfigError(f"{what} {path} cannot be created: {blocker} is a file, not a folder: choose another path")
    return path


def write_error(path: str | os.PathLike, error: BaseException) -> CheckpointError | None:
    """The one-line error for a failed write of ``path``, naming the folder and the fix; None for an exception that
    is not about the disk (a bug, which should keep its traceback).

    Disk full, quota, read-only file system and permissions are told apart by ``errno``; torch's zip writer reports
    a full disk only as a ``RuntimeError`` ("unexpected pos", "file write failed") and safetensors as its own error
    type ("os error 28"), so those are recognised by their text.
    """
    path = Path(path)
    folder = path.parent.absolute()
    if isinstance(error, OSError) and error.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = file_in_the_way(path)
        if blocker is not None:
            return CheckpointError(
                f"cannot write {path}: {blocker} is a file, not a folder: choose an output path under a folder"
            )
    if isinstance(error, OSError):
        known = _DISK_ERRORS.get(error.errno or -1)
        if known is None:
            return CheckpointError(f"cannot write {path} ({error.strerror or error}): choose a writable output path")
        what, fix = known
        space = _free_space(folder) if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return CheckpointError(f"cannot write {path}: {what.format(folder=folder)}{space}: {fix}")
    text = " ".join(str(error).split())
    code = _OS_ERROR_TEXT.search(text)
    if isinstance(error, Exception) and code is not None:
        number = int(code.group(1))
        return write_error(path, OSError(number, os.strerror(number)))
    if isinstance(error, Exception) and any(marker in text.lower() for marker in _FULL_DISK_TEXT):
        detail = text[-100:] if len(text) > 100 else text
        return CheckpointError(
            f"cannot write {path}: the write stopped part-way ({detail}), most likely because the disk holding "
            f"{folder} is full{_free_space(folder)}: free space there or choose an output folder on another disk"
        )
    return None


def _discard(path: Path) -> None:
    """Remove a temporary file (or folder) if it is there; never raises, as it runs while another error unwinds."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file behind.

    On any failure (an exception of the writer, a full disk, Ctrl-C) the temporary file is removed and ``path``
    keeps its previous content; disk problems become a one-line :class:`CheckpointError` (:func:`write_error`).
    A SIGKILL cannot be cleaned up after: :func:`remove_stale_temp_files` removes such leftovers later.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 temp files: give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp)
        error = write_error(path, e)
        if error is not None:
            raise error from None
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.tmpPID`` files (:func:`temp_path`) in ``folder`` that no running process is writing.

    A process killed during a save (SIGKILL, power loss) leaves its temporary file, possibly tens of MB. A file of
    this process's own id counts as stale too: call this before the process starts writing into ``folder`` (a
    restarted container often reuses the ids of the one before). Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    for entry in sorted(folder.iterdir()):
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and pid_alive(pid):
            continue
        try:
            entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: the same resolved path (symbolic links followed) or, when both exist, the same
    inode (hard links, bind mounts, case-insensitive names)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # a missing file, or a loop of symbolic links
        return False


def _inside(path: Path, folder: Path) -> bool:
    """``path`` lies somewhere under ``folder``, symbolic links followed."""
    try:
        return folder.resolve() in path.resolve().parents
    except (OSError, RuntimeError):
        return False


def refuse_overwriting_input(
    outputs: str | os.PathLike | Iterable[str | os.PathLike], *inputs: str | os.PathLike | None
) -> None:
    """Raise a one-line :class:`ConfigError` when writing ``outputs`` would replace one of ``inputs``, or when two
    of ``outputs`` are one file (the second write would replace the first).

    ``outputs`` is one path or several (e.g. OpenVINO's ``.xml`` and its ``.bin``); ``None`` inputs are skipped. An
    output is refused when it is the same file as an input (:func:`_same_file`) or a folder holding an input (a
    folder output, e.g. a ``.mlpackage`` or a data set, is replaced as a whole). Call it before any work, so that a
    command never reads its source, computes for minutes and then destroys that source with its result.
    """
    paths = [outputs] if isinstance(outputs, (str, os.PathLike)) else list(outputs)
    written: list[Path] = []
    for output in (Path(p).expanduser() for p in paths):
        twin = next((w for w in written if _same_file(w, output)), None)
        if twin is not None:
            raise ConfigError(
                f"two outputs of this command are the same file {output}"
                + (f" (also named {twin})" if str(twin) != str(output) else "")
                + ": the second would replace the first; give each output its own path"
            )
        written.append(output)
        for given in inputs:
            if given is None or str(given) == "":
                continue
            source = Path(given).expanduser()
            if _same_file(output, source):
                raise ConfigError(
                    f"output {output} is the same file as the input {source}: writing it would destroy the input; "
                    "choose another output path"
                )
            if _inside(source, output):
                raise ConfigError(
                    f"output {output} is a folder holding the input {source}: writing it would destroy the input; "
                    "choose another output path"
                )


# ---- models and data -----------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def subset_indices(length: int, limit: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset of ``limit`` indices (sorted), the same in training, ``eval`` and calibration.

    Random rather than the first ``limit`` because folder data sets are sorted by class; ``None`` or 0 means all.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"subset size must be 0 (all) or positive, got {limit}")
    if not limit or limit >= length:
        return list(range(length))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=generator)[:limit].tolist())


def jsonable(value: Any) -> Any:
    """Tuples to lists, recursively: the form in which builder arguments are stored with weights (JSON/YAML)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ---- the CPU -------------------------------------------------------------------------------------------------------


def _cpuinfo(key: str) -> str | None:
    """The first CPU's ``key`` line of ``/proc/cpuinfo`` (None where there is no such file or line)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str | None:
    """The CPU's model name (None where ``/proc/cpuinfo`` has none): every figure names its machine."""
    return _cpuinfo("model name")


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the CPU reports (empty where ``/proc/cpuinfo`` has none)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 or AMX). Without them it falls back to reference
    code: on an AVX2-only AMD EPYC a bf16-autocast Mask R-CNN step took 14x as long as an fp32 one."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's probe: assume the kernels are there
        return True


def cpu_int8_saturates() -> bool:
    """Whether this is an x86 CPU without VNNI, where onnxruntime's uint8 x int8 kernels sum pairs of products in
    16 bits (``vpmaddubsw``) and saturate: 255 x 127 x 2 > 32767. Unknown flags on x86 count as no VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    return not cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}
