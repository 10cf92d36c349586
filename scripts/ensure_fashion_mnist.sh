#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian's dataset-fashion-mnist: real images, no download at run time) is present.
set -euo pipefail
dir="${RAPIDNET_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if ls "$dir"/t10k-labels-idx1-ubyte* >/dev/null 2>&1 && ls "$dir"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found in $dir: installing Debian's dataset-fashion-mnist"
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  exit 0
fi
echo "Fashion-MNIST not found in $dir. Install it with 'sudo apt-get install -y dataset-fashion-mnist'," >&2
echo "or put the four IDX files in a folder and set RAPIDNET_FASHION_MNIST=/that/folder, then run 'make demo' again." >&2
exit 1
