"""Shared fixtures: the authors' reference data and randomised (non-trivial) RapidNet weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import rapidnet

DATA = Path(__file__).parent / "data"
# The authors' reference outputs live in ../shared/reference beside the checkout (absent on some machines).
REFERENCE = Path(os.environ.get("RAPIDNET_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))

MICRO = dict(depths=((1, 0), (1, 0), (1, 1), (1, 1)), widths=(16, 24, 32, 48), head_dim=64)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny models: on a shared 2-core machine a second torch thread only waits (up to 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_back_to_one(_one_torch_thread):
    """A test that sets the thread count (the bench, a 2-thread training) must not change the next test's rounding."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_expected() -> dict:
    return torch.load(DATA / "micro_expected.pt", weights_only=True)


@pytest.fixture(scope="session")
def micro_checkpoint() -> Path:
    return DATA / "micro_official_format.pth"


@pytest.fixture(scope="session")
def reference_module():
    """``make_checkpoint`` from the shared reference folder (skips where it is not present)."""
    if not (REFERENCE / "make_checkpoint.py").exists():
        pytest.skip(f"no reference data at {REFERENCE}")
    sys.path.insert(0, str(REFERENCE))
    import make_checkpoint

    return make_checkpoint


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and every layer scale a large value, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "bn.weight" in name else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
    return model


@pytest.fixture(scope="session")
def fmnist_micro_checkpoint(tmp_path_factory) -> Path:
    """A micro RapidNet-Ti with Fashion-MNIST's class names and trained-like layer scales (logits O(1..10)), saved
    as this project's safetensors: what the export and int8 tests start from."""
    from rapidnet.data import FASHION_MNIST_CLASSES

    torch.manual_seed(0)
    model = randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.mul_(0.1)
    path = tmp_path_factory.mktemp("ckpt") / "micro_fmnist.safetensors"
    rapidnet.save_weights(model, path, {"class_names": json.dumps(list(FASHION_MNIST_CLASSES))})
    return path


@pytest.fixture
def micro_model() -> torch.nn.Module:
    return randomize_(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)).eval()


@pytest.fixture(scope="session")
def fm_root(tmp_path_factory) -> Path:
    """The real Fashion-MNIST where installed, else a small stand-in with garment-like blobs."""
    import numpy as np

    from rapidnet.data import DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_FILES, is_fashion_mnist_folder, write_idx

    if is_fashion_mnist_folder(DEFAULT_FASHION_MNIST_DIR):
        return DEFAULT_FASHION_MNIST_DIR
    root = tmp_path_factory.mktemp("fm")
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 20)):
        yy, xx = np.mgrid[0:28, 0:28]
        images = np.stack(
            [((xx - 14) ** 2 + (yy - 14) ** 2 < rng.integers(40, 150)) * rng.integers(80, 255) for _ in range(n)]
        ).astype(np.uint8)
        write_idx(root / FASHION_MNIST_FILES[f"{split}-images"], images)
        write_idx(root / FASHION_MNIST_FILES[f"{split}-labels"], rng.integers(0, 10, n).astype(np.uint8))
    return root


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """``torchrun(*rapidnet_args)``: the ``rapidnet`` CLI in 2 CPU processes (gloo, one thread each, a free port)."""

    def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        src = Path(rapidnet.__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "rapidnet.cli.main", *map(str, args)]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    return run


# The dense tests' tiny runs: a two-block RapidNet-Ti, one epoch on a 64-px mosaic.
TINY_MODEL = """
model:
  name: rapidnet_ti
  drop_path_rate: 0.0
  kwargs: {depths: [[1, 0], [1, 0], [1, 1], [1, 1]], widths: [16, 24, 32, 48], head_dim: 64}
data: {batch_size: 2, workers: 0}
ema: {enabled: false}
train: {epochs: 1, seed: 0, log_interval: 1, device: cpu}
"""
DET_CONFIG = (
    TINY_MODEL
    + """
optim: {opt: adamw, lr: 1.0e-4, weight_decay: 0.05}
sched: {name: cosine, warmup_epochs: 0, min_lr: 1.0e-6, step_on_epochs: false}
task:
  name: detection
  min_size: 64
  max_size: 64
  model_kwargs: {fpn_channels: 32, anchor_sizes: [8, 16, 32, 64, 128], rpn_pre_nms_top_n_train: 200,
                 rpn_post_nms_top_n_train: 100, box_batch_size_per_image: 32, rpn_pre_nms_top_n_test: 100,
                 rpn_post_nms_top_n_test: 50}
"""
)
SEG_CONFIG = (
    TINY_MODEL
    + """
optim: {opt: adamw, lr: 1.0e-3, weight_decay: 1.0e-4}
sched: {name: poly, warmup_epochs: 0, min_lr: 0.0, decay_rate: 0.9, step_on_epochs: false}
task:
  name: segmentation
  scale: [64, 64]
  crop_size: [64, 64]
  model_kwargs: {fpn_channels: 32, head_channels: 32}
"""
)


def tiny_dense_run(folder: Path, fm_root: Path, kind: str, seed: int = 1) -> tuple[Path, Path]:
    """A 64-px mosaic (6 train / 3 val scenes) in ``folder`` and a one-epoch ``det|seg train`` run on it:
    ``(model_best checkpoint, data folder)``, what the export tests start from."""
    from rapidnet.cli.main import main

    data = folder / "mosaic"
    code = main(["data", "mosaic", "--out", str(data), "--fashion-mnist", str(fm_root), "--num-train", "6",
                 "--num-val", "3", "--num-dev", "0", "--image-size", "64", "--seed", str(seed),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    command, config = {"detection": ("det", DET_CONFIG), "segmentation": ("seg", SEG_CONFIG)}[kind]
    (folder / f"{command}.yaml").write_text(config)
    out = folder / "run"
    code = main([command, "train", "--config", str(folder / f"{command}.yaml"), "--data", str(data), "--output",
                 str(out), "--limit-train", "4", "--no-progress"])  # fmt: skip
    assert code == 0
    return out / "model_best.safetensors", data


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """The ``rapidnet`` command in-process: ``(exit status, stdout, stderr)``; argparse's own usage errors
    (SystemExit) count as their exit status."""
    from rapidnet.cli.main import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small Fashion-MNIST-like data set for the tiny classification runs of the run-folder tests."""
    from test_train import make_fashion_like

    return make_fashion_like(tmp_path_factory.mktemp("fm"), n_train=32, n_val=16)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The 7-epoch Fashion-MNIST config shrunk to a micro model and one epoch of 16-image batches."""
    from test_train import FASHION_CONFIG, MICRO_KWARGS

    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(
        f"base: {FASHION_CONFIG}\n"
        f"model: {{kwargs: {MICRO_KWARGS}}}\n"
        "data: {batch_size: 16, eval_batch_size: 16}\n"
        "optim: {lr_base_size: 16}\n"
        "train: {epochs: 1, log_interval: 1}\n"
    )
    return path
