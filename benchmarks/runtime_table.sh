#!/usr/bin/env bash
# The runtime table of docs/performance.md: RapidNet-Ti beside MobileNetV2 x1.4 in every runtime, fp32 and int8, at
# batch 1 and batch 32 (224x224), and the Semantic FPN graph of each at 512x512, each in one interleaved run.
#   bash benchmarks/runtime_table.sh [OUT_DIR]
# Run it on an otherwise idle machine; every ratio in the docs comes from one of these runs.
set -euo pipefail
out=${1:-runs/runtime_table}
rn=.venv/bin/rapidnet
mkdir -p "$out"
all="torch torch-compile aoti onnx onnx-int8 openvino openvino-int8 executorch executorch-int8 litert litert-int8"

echo "== batch 1, 224x224, 2 threads"
$rn bench --models rapidnet_ti mobilenetv2_140 --backends $all --threads 2 --rounds 30 --output "$out/b1" > "$out/b1.txt"
echo "== batch 32, 224x224, 2 threads"
$rn bench --models rapidnet_ti mobilenetv2_140 --backends $all --batch 32 --threads 2 --rounds 6 \
    --output "$out/b32" > "$out/b32.txt"
echo "== Semantic FPN, batch 1, 512x512, 2 threads"
$rn bench --models semantic_fpn:rapidnet_ti semantic_fpn:mobilenetv2_140 --resolution 512 --backends $all \
    --threads 2 --rounds 10 --output "$out/seg512" > "$out/seg512.txt"
cat "$out/b1.txt" "$out/b32.txt" "$out/seg512.txt"
