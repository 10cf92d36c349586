#!/usr/bin/env bash
# The eager-PyTorch and ONNX Runtime CPU figures of docs/performance.md (fused vs unfused, the operator profile, ONNX
# Runtime's profile, training throughput, the peer table) and the int8 accuracy of docs/results.md, in one go, on an
# otherwise idle machine. The other runtimes' tables come from benchmarks/runtime_table.sh, the demo from make demo.
#   bash benchmarks/cpu_figures.sh [OUT_DIR] [RAPIDNET_CKPT] [MOBILENET_CKPT]
# The checkpoints are the Fashion-MNIST runs of configs/fashion_mnist_{rapidnet_ti_long,mobilenetv2_140}.yaml.
set -euo pipefail
out=${1:-runs/figures}
ti=${2:-runs/fashion_mnist_rapidnet_ti_long/model_best.safetensors}
mnv2=${3:-runs/fashion_mnist_mobilenetv2_140/model_best.safetensors}
py=.venv/bin/python
rn=.venv/bin/rapidnet
mkdir -p "$out"

echo "== fused vs unfused, eager PyTorch, batch 1, 224, 2 threads"
$py benchmarks/reparam_speedup.py --rounds 40 > "$out/reparam_nchw.json"
$py benchmarks/reparam_speedup.py --rounds 40 --channels-last > "$out/reparam_channels_last.json"

echo "== where the time goes: PyTorch profiler, fused RapidNet-Ti, 2 threads"
$py - > "$out/profile_top_ops.txt" <<'PY'
import torch, rapidnet
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
model = rapidnet.reparameterize(rapidnet.create_model("rapidnet_ti"))  # the folded model eager users run
x = torch.randn(1, 3, 224, 224)
with torch.inference_mode():
    for _ in range(5):
        model(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(20):
            model(x)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                         max_name_column_width=30, max_shapes_column_width=60))
PY

echo "== where onnxruntime's time goes, fp32 and int8, 2 threads"
$py benchmarks/ort_profile.py --models rapidnet_ti mobilenetv2_140 --threads 2 --rounds 30 > "$out/ort_profile.json"

echo "== training throughput, batch 64 at 224, 2 threads"
$py benchmarks/train_throughput.py --rounds 5 > "$out/train_throughput.json"

echo "== RapidNet beside its peers: eager, channels_last, onnxruntime fp32 and int8"
$rn bench --backends torch torch-cl onnx onnx-int8 --rounds 20 --output "$out/bench" > "$out/bench.txt"

if [ -f "$ti" ]; then
  echo "== int8 accuracy on Fashion-MNIST (test split) against fp32"
  $rn quantize --checkpoint "$ti" --calib fashion-mnist --calib-size 512 --eval-data fashion-mnist \
      --eval-size 10000 --output "$out/ti_fmnist_int8.onnx" --save-fp32 "$out/ti_fmnist_fp32.onnx" --threads 2 \
      --json > "$out/quantize.json"
  $rn eval --checkpoint "$ti" --data fashion-mnist --json > "$out/eval_ti.json"
fi
if [ -f "$mnv2" ]; then $rn eval --checkpoint "$mnv2" --data fashion-mnist --json > "$out/eval_mnv2.json"; fi
echo "wrote $out"
