"""Analyses of trained (or untrained) networks: the effective receptive field of each stage (``erf.py``)."""

from rapidnet.analysis.erf import (
    ERF_THRESHOLDS,
    ReceptiveField,
    StageFeatures,
    build_model,
    erf_centre,
    erf_fractions,
    input_gradient_map,
    load_images,
    measure_erf,
    model_normalization,
    plot_erf,
    receptive_field,
    stage_features,
    theoretical_rf,
)

__all__ = [
    "ERF_THRESHOLDS",
    "ReceptiveField",
    "StageFeatures",
    "build_model",
    "erf_centre",
    "erf_fractions",
    "input_gradient_map",
    "load_images",
    "measure_erf",
    "model_normalization",
    "plot_erf",
    "receptive_field",
    "stage_features",
    "theoretical_rf",
]
