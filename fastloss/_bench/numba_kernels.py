"""Fused numba kernels, the numba anchor. Imported only when numba is present.

Each kernel writes the gradient of the mean loss into a preallocated array
and returns the mean loss. The elementwise and cross-entropy kernels read
their inputs once; the Dice kernel reads them twice, because its gradient
needs the per-class sums of the whole first pass. Sums run in float64
(numba's ``prange`` reduction) whatever the input dtype. Compiled kernels
are cached on disk (``cache=True``), so only the first run pays for
compilation, which happens during the correctness check and is never timed.
"""

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def mse_loss_grad(pred, target, grad):
    n = pred.size
    scale = 2.0 / n
    total = 0.0
    for i in prange(n):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
        grad[i] = d * scale
    return total / n


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def dice_loss_grad(logits, target, grad, eps):
    """Multiclass soft Dice over ``(N, C, S)`` views, ``smooth=0``.

    Pass 1 sums, per block of positions, the intersection ``sum(p*y)`` and
    ``sum(p)`` of every class, so that the blocks run in parallel. Pass 2
    recomputes the softmax and writes the gradient.
    """
    n_batch, n_classes, n_spatial = logits.shape
    block = 4096
    per_sample = (n_spatial + block - 1) // block
    n_blocks = n_batch * per_sample
    intersection_parts = np.zeros((n_blocks, n_classes))
    prob_parts = np.zeros((n_blocks, n_classes))
    count_parts = np.zeros((n_blocks, n_classes))
    for b in prange(n_blocks):
        n = b // per_sample
        start = (b - n * per_sample) * block
        stop = min(start + block, n_spatial)
        for s in range(start, stop):
            peak = -math.inf
            for c in range(n_classes):
                peak = max(peak, np.float64(logits[n, c, s]))
            norm = 0.0
            for c in range(n_classes):
                norm += math.exp(np.float64(logits[n, c, s]) - peak)
            y = target[n, s]
            for c in range(n_classes):
                prob_parts[b, c] += math.exp(np.float64(logits[n, c, s]) - peak) / norm
            intersection_parts[b, y] += math.exp(np.float64(logits[n, y, s]) - peak) / norm
            count_parts[b, y] += 1.0

    intersection = intersection_parts.sum(axis=0)
    cardinality = prob_parts.sum(axis=0) + count_parts.sum(axis=0)
    present = count_parts.sum(axis=0) > 0
    slope = np.zeros(n_classes)
    coefficient = np.zeros(n_classes)
    total = 0.0
    for c in range(n_classes):
        denominator = max(cardinality[c], eps)
        if present[c]:
            total += 1.0 - 2.0 * intersection[c] / denominator
            coefficient[c] = 2.0 / denominator / n_classes
            if cardinality[c] > eps:
                slope[c] = 2.0 * intersection[c] / denominator**2 / n_classes

    for b in prange(n_blocks):
        n = b // per_sample
        start = (b - n * per_sample) * block
        stop = min(start + block, n_spatial)
        for s in range(start, stop):
            peak = -math.inf
            for c in range(n_classes):
                peak = max(peak, np.float64(logits[n, c, s]))
            norm = 0.0
            for c in range(n_classes):
                norm += math.exp(np.float64(logits[n, c, s]) - peak)
            y = target[n, s]
            inner = 0.0
            for c in range(n_classes):
                p = math.exp(np.float64(logits[n, c, s]) - peak) / norm
                g = slope[c] - (coefficient[c] if c == y else 0.0)
                inner += p * g
            for c in range(n_classes):
                p = math.exp(np.float64(logits[n, c, s]) - peak) / norm
                g = slope[c] - (coefficient[c] if c == y else 0.0)
                grad[n, c, s] = p * (g - inner)
    return total / n_classes
