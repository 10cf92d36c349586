"""The ``rapidnet`` command for the model issue: info, convert, predict and their one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import rapidnet
from conftest import MICRO, run_cli
from rapidnet.models.checkpoint import infer_arch

SAMPLE = __import__("pathlib").Path(rapidnet.__file__).parent / "assets" / "sample_ankle_boot.png"


def test_info_json_equals_spec(capsys):
    code, out, _ = run_cli(capsys, "info", "rapidnet_ti", "rapidnet_m", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["rapidnet_ti"]["params"] == 6_627_840 and rows["rapidnet_ti"]["params_no_dist"] == 6_114_840
    assert rows["rapidnet_m"]["params"] == 17_304_496
    assert rows["rapidnet_ti"]["gmacs"] == pytest.approx(0.617, rel=0.005)
    assert rows["rapidnet_ti"]["gmacs_reparam"] <= rows["rapidnet_ti"]["gmacs"]
    assert rows["rapidnet_ti"]["params_reparam"] < rows["rapidnet_ti"]["params_no_dist"]


def test_info_table_and_resolution(capsys):
    code, out, _ = run_cli(capsys, "info", "rapidnet_ti", "--resolution", "256", "320")
    assert code == 0 and "256x320" in out and "6,627,840" in out


def test_convert_authors_checkpoint_reparameterized(capsys, tmp_path, micro_checkpoint, micro_expected):
    dst = tmp_path / "micro_fused.safetensors"
    code, out, _ = run_cli(capsys, "convert", str(micro_checkpoint), str(dst), "--reparameterize")
    assert code == 0 and "reparameterized" in out and dst.exists()
    model = rapidnet.load_model(dst)
    assert infer_arch(model.state_dict()).reparameterized
    with torch.no_grad():
        assert torch.allclose(model(micro_expected["input"]), micro_expected["logits"], atol=1e-4, rtol=1e-4)


def test_predict_with_random_weights_says_so(capsys):
    code, out, _ = run_cli(capsys, "predict", str(SAMPLE), "--top-k", "3", "--json")
    assert code == 0 and "RANDOM weights" in out
    result = json.loads(out[out.index("[") :])
    probs = [p["prob"] for p in result[0]["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_predict_uses_class_names_from_checkpoint(capsys, tmp_path):
    model = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)
    names = ["cat", "dog", "bird"]
    rapidnet.save_weights(
        model,
        tmp_path / "m.safetensors",
        {"class_names": json.dumps(names), "pretrained_cfg": json.dumps({"input_size": [3, 32, 32]})},
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.png")
    code, out, _ = run_cli(capsys, "predict", str(folder), "--checkpoint", str(tmp_path / "m.safetensors"), "--json")
    result = json.loads(out)
    assert code == 0 and {p["class"] for p in result[0]["top"]} == set(names)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "/nonexistent.pth", "/tmp/x.safetensors"], "not found"),
        (["info", "rapidnet_xl"], "unknown variant"),
        (["info", "--resolution", "16"], "at least 32"),
        (["predict", "/nonexistent.png"], "image not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_convert_to_unwritable_path(capsys, micro_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "convert", str(micro_checkpoint), str(blocker / "out.safetensors"))
    assert code == 2 and "cannot write" in err


def test_console_script_entry_point():
    """The installed ``rapidnet`` command (or ``python -m``) runs in a fresh process."""
    exe = shutil.which("rapidnet")
    cmd = [exe] if exe else [sys.executable, "-m", "rapidnet.cli.main"]
    proc = subprocess.run([*cmd, "info", "rapidnet_ti", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["params"] == 6_627_840


# ---- every command loads through rapidnet.load ----------------------------------------------------------------------


def _sample_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    shutil.copy(SAMPLE, folder / "a.png")
    return folder


def test_convert_keeps_class_names_and_eval_transform(capsys, tmp_path):
    names = ["cat", "dog", "bird"]
    src = rapidnet.save_weights(
        rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO),
        tmp_path / "src.pt",
        {"class_names": json.dumps(names), "pretrained_cfg": json.dumps({"input_size": [3, 40, 40]})},
    )
    dst = tmp_path / "dst.safetensors"
    code, out, _ = run_cli(capsys, "convert", str(src), str(dst), "--reparameterize")
    assert code == 0 and "reparameterized" in out
    model, meta = rapidnet.load(dst)
    assert meta["class_names"] == names and model.pretrained_cfg["input_size"] == (3, 40, 40)
    code, out, _ = run_cli(capsys, "predict", str(_sample_folder(tmp_path)), "--checkpoint", str(dst), "--json")
    assert code == 0 and {p["class"] for p in json.loads(out)[0]["top"]} == set(names)


def test_predict_and_convert_a_timm_peer_checkpoint(capsys, tmp_path):
    import timm

    names = ["coat", "shirt"]
    peer = timm.create_model("resnet10t", num_classes=2)
    torch.save({"state_dict": peer.state_dict()}, tmp_path / "peer.pth")  # no metadata: --model names it
    code, out, _ = run_cli(capsys, "convert", str(tmp_path / "peer.pth"), str(tmp_path / "p.safetensors"),
                           "--model", "resnet10t")  # fmt: skip
    assert code == 0 and "timm model resnet10t, 2 classes" in out
    model, meta = rapidnet.load(tmp_path / "p.safetensors")
    assert (meta["format"], meta["arch"]) == ("timm", "resnet10t")
    assert torch.equal(model.fc.weight, peer.fc.weight)
    rapidnet.save_weights(peer, tmp_path / "named.safetensors", {"class_names": json.dumps(names)})
    code, out, _ = run_cli(capsys, "predict", str(SAMPLE), "--checkpoint", str(tmp_path / "named.safetensors"),
                           "--json")  # fmt: skip
    assert code == 0 and {p["class"] for p in json.loads(out)[0]["top"]} == set(names)


def test_wrong_kind_or_malformed_checkpoint_is_one_line_and_exit_2(capsys, tmp_path):
    from safetensors.torch import save_file

    dense = {"format": "rapidnet-detection", "task": "detection", "build_args": "{}", "class_names": "[]"}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "det.safetensors"), dense)
    code, _, err = run_cli(capsys, "predict", str(SAMPLE), "--checkpoint", str(tmp_path / "det.safetensors"))
    assert code == 2 and "holds a detection model, not classification" in err and err.count("\n") == 1
    model = rapidnet.create_model("rapidnet_ti", num_classes=3, **MICRO)
    bad = str(rapidnet.save_weights(model, tmp_path / "bad.safetensors", {"class_names": "['cat'"}))
    for argv in (["predict", str(SAMPLE), "--checkpoint", bad], ["convert", bad, str(tmp_path / "o.safetensors")]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "bad.safetensors has unreadable 'class_names' metadata" in err and err.count("\n") == 1


# ---- start-up: the parsers never load torch ------------------------------------------------------------------------

# Runs ``main`` on each argv given as JSON and prints, per argv, the exit status and whether torch got imported: a
# fresh interpreter, as the pytest process has torch imported already.
_STARTUP_PROBE = """
import contextlib, io, json, sys
from rapidnet.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([argv, code, sorted(m for m in ("torch", "timm") if m in sys.modules)])
print(json.dumps(results))
"""


def _startup(argvs: list[list[str]]) -> list[tuple[list[str], int, list[str]]]:
    proc = subprocess.run([sys.executable, "-c", _STARTUP_PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


def test_version_and_help_do_not_import_torch():
    """``rapidnet --version`` and ``--help`` answer at once: no torch, no timm (seconds and a gigabyte to import)."""
    for argv, code, heavy in _startup([["--version"], ["--help"]]):
        assert code == 0, argv
        assert heavy == [], f"rapidnet {' '.join(argv)} imported {heavy}"


def test_every_subcommand_help_works_without_torch():
    """Each subcommand's ``--help`` (and each action of det, seg, data) exits 0, and none of them imports torch."""
    from rapidnet.cli.main import _SUBCOMMANDS

    argvs = [[name, "--help"] for name in _SUBCOMMANDS]
    argvs += [[name, action, "--help"] for name in ("det", "seg") for action in ("train", "eval", "predict")]
    argvs += [["data", "mosaic", "--help"]]
    for argv, code, heavy in _startup(argvs):
        assert code == 0, f"rapidnet {' '.join(argv)} exited {code}"
        assert heavy == [], f"rapidnet {' '.join(argv)} imported {heavy}"
