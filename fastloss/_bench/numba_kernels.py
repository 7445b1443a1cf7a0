"""Fused numba kernels, the numba anchor. Imported only when numba is present.

Each kernel reads its inputs once, writes the gradient of the mean loss into
a preallocated array and returns the mean loss. Sums run in float64
(numba's ``prange`` reduction) whatever the input dtype.
"""

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True)
def mse_loss_grad(pred, target, grad):
    n = pred.size
    scale = 2.0 / n
    total = 0.0
    for i in prange(n):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
        grad[i] = d * scale
    return total / n


@njit(parallel=True)
def huber_loss_grad(pred, target, grad, delta):
    n = pred.size
    scale = 1.0 / n
    total = 0.0
    for i in prange(n):
        d = np.float64(pred[i]) - np.float64(target[i])
        a = abs(d)
        if a <= delta:
            total += 0.5 * d * d
            grad[i] = d * scale
        else:
            total += delta * (a - 0.5 * delta)
            grad[i] = math.copysign(delta, d) * scale
    return total / n


@njit(parallel=True)
def bce_with_logits_loss_grad(logits, target, grad):
    n = logits.size
    scale = 1.0 / n
    total = 0.0
    for i in prange(n):
        x = np.float64(logits[i])
        t = np.float64(target[i])
        # softplus(x) - t*x, with softplus(x) = max(x, 0) + log1p(exp(-|x|)).
        e = math.exp(-abs(x))
        total += max(x, 0.0) + math.log1p(e) - t * x
        sigmoid = 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)
        grad[i] = (sigmoid - t) * scale
    return total / n


@njit(parallel=True)
def cross_entropy_loss_grad(logits, target, grad):
    """Cross-entropy over ``(outer, C, inner)`` views, mean over positions."""
    outer, n_classes, inner = logits.shape
    positions = outer * inner
    scale = 1.0 / positions
    total = 0.0
    for p in prange(positions):
        o = p // inner
        j = p - o * inner
        peak = -math.inf
        for c in range(n_classes):
            peak = max(peak, np.float64(logits[o, c, j]))
        norm = 0.0
        for c in range(n_classes):
            norm += math.exp(np.float64(logits[o, c, j]) - peak)
        y = target[o, j]
        total += math.log(norm) + peak - np.float64(logits[o, y, j])
        for c in range(n_classes):
            prob = math.exp(np.float64(logits[o, c, j]) - peak) / norm
            grad[o, c, j] = (prob - (1.0 if c == y else 0.0)) * scale
    return total / positions
