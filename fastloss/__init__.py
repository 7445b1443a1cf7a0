"""fastloss: fused, OpenMP-parallel loss functions and gradients for NumPy.

Every loss is a plain function that takes array-likes and returns the loss,
or ``(loss, grad)`` with ``return_grad=True``, computed in one pass by a
compiled kernel.
"""

from ._kernels import SIMD_LEVEL as _SIMD_LEVEL
from ._kernels._openmp import openmp_enabled
from .diagnosis import Diagnosis, Finding, diagnose
from .overlap import dice_loss, jaccard_loss, tversky_loss
from .regression import (
    huber_loss,
    l1_loss,
    log_cosh_loss,
    mse_loss,
    pinball_loss,
    rmse_loss,
    smooth_l1_loss,
)
from .sigmoid import binary_cross_entropy_with_logits, sigmoid_focal_loss
from .softmax import cross_entropy, focal_loss

__version__ = "0.1.0"


def simd_level():
    """Return the SIMD build of the kernels in use: "baseline", "avx2" or "avx512".

    The choice is made at import from the CPU's features. Setting the
    environment variable ``FASTLOSS_SIMD`` to one of these names before the
    import caps it; every build gives the same results.
    """
    return _SIMD_LEVEL

__all__ = [
    "openmp_enabled",
    "simd_level",
    # Regression
    "mse_loss",
    "rmse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "log_cosh_loss",
    "pinball_loss",
    # Classification and segmentation
    "cross_entropy",
    "focal_loss",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "dice_loss",
    "jaccard_loss",
    "tversky_loss",
    # Diagnosis
    "diagnose",
    "Diagnosis",
    "Finding",
]
