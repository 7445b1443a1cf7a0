"""fastloss: fused, OpenMP-parallel loss functions and gradients for NumPy.

Every loss is a plain function that takes array-likes and returns the loss,
or ``(loss, grad)`` with ``return_grad=True``, computed in one pass by a
compiled kernel.
"""

from ._kernels._openmp import openmp_enabled
from .overlap import dice_loss, jaccard_loss, tversky_loss
from .sigmoid import binary_cross_entropy_with_logits, sigmoid_focal_loss

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy_with_logits",
    "dice_loss",
    "jaccard_loss",
    "openmp_enabled",
    "sigmoid_focal_loss",
    "tversky_loss",
]
