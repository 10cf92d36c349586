"""Every variant, classifier and ``features_only`` backbone, exported to OpenVINO IR and ExecuTorch (XNNPACK) and run in
that runtime against PyTorch: the largest deviation per export, as JSON lines.

    python benchmarks/export_runtimes_check.py --resolution 224 --formats openvino executorch

Weights are random but trained-like (BatchNorm statistics and layer scales drawn as in ``tests/conftest.py``), so the
folded graph is not trivially small; the verdict is ``allclose(runtime, pytorch, rtol=1e-4, atol=1e-4)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import rapidnet
from rapidnet.deploy import export

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize_


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(rapidnet.VARIANTS))
    p.add_argument("--formats", nargs="+", default=["openvino", "executorch"])
    p.add_argument("--resolution", type=int, default=224)
    args = p.parse_args()
    suffix = {"openvino": ".xml", "executorch": ".pte"}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for features_only in (False, True):
                torch.manual_seed(0)
                model = randomize_(rapidnet.create_model(variant, features_only=features_only)).eval()
                with torch.no_grad():  # trained-like layer scales, as tests/test_export.py's full-size check
                    for name, param in model.named_parameters():
                        if name.endswith("gamma"):
                            param.mul_(0.1)
                for fmt in args.formats:
                    start = time.perf_counter()
                    res = args.resolution
                    result = export(model, Path(tmp) / f"m{suffix[fmt]}", fmt, resolution=(res, res))
                    print(json.dumps({
                        "variant": variant,
                        "features_only": features_only,
                        "format": fmt,
                        "ok": result.ok,
                        "max_abs_diff": max(c.max_abs_diff for c in result.checks),
                        "max_rel_err": max(c.max_rel_err for c in result.checks),
                        "max_abs_output": max(c.max_abs_ref for c in result.checks),
                        "seconds": round(time.perf_counter() - start, 1),
                    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
