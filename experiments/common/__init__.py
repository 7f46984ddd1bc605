"""Shared code of the experiments: criteria, loops, metrics, seeding, result files, plots."""
from .losses import (CRITERIA, CrossEntropyCriterion, FIERCECriterion, LabelSmoothingCriterion, ScaledCosineEntropy,
                     label_smoothing_cross_entropy)
from .metrics import abundance_mse, accuracy, orient, orientation, ot_age_mse, ot_map_1d, transfer_mse
from .seeding import seed_everything
from .training import TensorBatches, collect_outputs, train_epoch

__all__ = [
    "CRITERIA", "CrossEntropyCriterion", "FIERCECriterion", "LabelSmoothingCriterion", "ScaledCosineEntropy",
    "label_smoothing_cross_entropy", "abundance_mse", "accuracy", "orient", "orientation", "ot_age_mse", "ot_map_1d",
    "transfer_mse", "seed_everything", "TensorBatches", "collect_outputs", "train_epoch",
]
