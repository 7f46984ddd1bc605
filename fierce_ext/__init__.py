"""fierce_ext: FIERCE, the feature-entropy regularizer, with fused kernels.

    loss = criterion(logits, target) - lam * fierce_ext.entropy(features)

See README.md for the math, the backends and measured performance.
"""

from .backends import BackendStatus, available_backends
from .dictionary import bin_dictionary, uniform_dictionary
from .functional import entropy, histogram, histogram_entropy
from .modules import FeatureEntropy, FIERCELoss

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "FIERCELoss",
    "FeatureEntropy",
    "available_backends",
    "bin_dictionary",
    "entropy",
    "histogram",
    "histogram_entropy",
    "uniform_dictionary",
]
