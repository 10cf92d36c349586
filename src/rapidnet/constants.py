"""Bounds, names and defaults that the command line's parsers show and check, as plain values.

This module imports nothing, so ``rapidnet --help`` and every ``rapidnet COMMAND --help`` build their parsers without
loading torch. The modules that act on these values (``models/checkpoint.py``, ``config.py``, ``data/``,
``metrics.py``, ``analysis/erf.py``, ``deploy/onnx.py``, ...) import them from here, so each has one definition.
"""

from __future__ import annotations

# ---- bounds on what a file may ask for ------------------------------------------------------------------------------
# A checkpoint is untrusted input: a few bytes of metadata must not make a command allocate gigabytes. The bounds are
# far beyond every real model (ImageNet-21k has 21,843 classes, the largest eval size in timm is 1,024 pixels) and far
# below what exhausts a machine's memory. Flags that take the same quantities share them.

#: the most classes (and class names) a file may describe
MAX_CLASSES = 100_000
#: the longest class name, and the longest plain string a file's metadata may hold
MAX_NAME_CHARS = 256
#: the sides (pixels) an eval transform may resize to: a 4096 x 4096 RGB image is 200 MB as float32
MIN_SIDE, MAX_SIDE = 16, 4096
#: the smallest stored crop fraction (real ones are 0.875..1), and the largest side the eval resize may reach
MIN_CROP_PCT, MAX_RESIZE = 0.25, 2 * MAX_SIDE
#: the resize interpolations timm's eval transform knows (``timm.data.transforms.str_to_interp_mode``)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
#: timm's eval crop modes
CROP_MODES = ("center", "squash", "border")
#: the widest layer and the most input channels a stored architecture may have
MAX_WIDTH, MAX_CHANS = 16_384, 16

# ---- names and defaults ---------------------------------------------------------------------------------------------

#: what ``--data`` takes for the Fashion-MNIST files found on this system (``rapidnet.data.build_dataset``)
FASHION_MNIST_NAME = "fashion-mnist"
#: the looks of the Fashion-MNIST mosaic (``rapidnet.data.mosaic``, which holds one look per name)
MOSAIC_STYLES = ("black", "dark", "tinted")
DEFAULT_MOSAIC_STYLE = "black"
#: bootstrap resamples of an evaluation's images for its 95% interval (``rapidnet.metrics``)
DEFAULT_BOOTSTRAP = 1000
#: the largest probe side (pixels) ``rapidnet.analysis.erf.receptive_field`` tries: a larger RF is reported as this,
#: flagged ``clipped``
RF_CAP = 1024
#: the ONNX opset of exports: opset 20 has a native Gelu op, which onnxruntime runs fused (``rapidnet.deploy.onnx``)
DEFAULT_OPSET = 20

# ---- bounds on counts, sizes and times given on the command line or in a config --------------------------------------
# Each is far beyond any real use and stated in the error, so a typo (1e9 for 1e3) is refused at once instead of
# running for days or allocating without a word.

#: epochs of one run
MAX_EPOCHS = 100_000
#: minutes of a time budget (about 69 days)
MAX_TIME_BUDGET = 100_000
#: images per step on one process
MAX_BATCH = 65_536
#: data loading processes per training process
MAX_WORKERS = 256
#: images of a data set subset (--limit-train, --limit-val, --limit)
MAX_IMAGES = 100_000_000
#: scenes of one split of the Fashion-MNIST mosaic, and garments in one scene
MAX_SCENES, MAX_OBJECTS = 1_000_000, 64
#: random seeds (numpy takes 32 bits)
MAX_SEED = 2**32 - 1
#: steps between step log records, and epochs between evaluations
MAX_INTERVAL = 1_000_000
