# Overlap losses: soft Dice, Jaccard (IoU) and Tversky.
#
# All three share one form. With per-class sums I = sum(p * y), P = sum(p)
# and Y = sum(y) over the kept positions,
#
#     loss = 1 - (a * I + smooth) / max(kI * I + kP * P + kY * Y + smooth, eps)
#
# Dice is (a, kI, kP, kY) = (2, 0, 1, 1), Jaccard (1, -1, 1, 1) and Tversky
# (1, 1 - alpha - beta, alpha, beta), because FP = P - I and FN = Y - I.
#
# Layers:
#   1. Per-position loaders fill the class probabilities of one position
#      (softmax over the class axis, or one sigmoid per element). The
#      class-index kernels take the softmax of a tile of TILE contiguous
#      positions by all classes at once (``softmax_tile``), so that every
#      loop runs over positions and vectorizes.
#   2. Pass 1 (``*_sums_block``) accumulates I, P and Y of one block of
#      positions into that block's own slots. Every block lies inside one
#      sample, and block boundaries depend only on the shape, so combining
#      the blocks in a fixed pairwise order gives sums that are bit-identical
#      for every thread count.
#   3. ``finish_losses`` turns the sums into per-(sample, class) losses and
#      the coefficients gI = dloss/dI and gP = dloss/dP, already scaled by
#      ``grad_scale`` (1/(samples * classes) for ``mean``).
#   4. Pass 2 (``*_grad_block``) writes the gradient of every position from
#      those coefficients: dloss/dp = gI * y + gP, then the chain rule
#      through the softmax or the sigmoid. The class-index pass 1 stores its
#      probabilities in the gradient array, and pass 2 reads them from there.
#
# The Python wrapper has already viewed the logits (and a dense target) as
# ``(outer, C, inner)`` and an index target as ``(outer, inner)``, with the
# sample axis leading ``outer``, and has validated every argument except the
# range of class indices, which ``overlap_index`` checks before pass 1.

from cython.parallel cimport prange, threadid

from libc.math cimport exp, INFINITY, NAN
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from ._common cimport (
    floating, BLOCK_SIZE, MIN_PARALLEL_ITEMS, n_blocks, threads_for, sum_partials,
)
from ._fastmath cimport fast_exp

# Below this many logits a call runs on one thread whatever n_threads says.
PARALLEL_MIN_ITEMS = MIN_PARALLEL_ITEMS

cdef enum:
    # Positions per tile of the class-index kernels: a multiple of every
    # SIMD width. The per-thread buffers of 21 classes then take 45 KB.
    TILE = 64


cdef inline double sum_strided(const double* x, Py_ssize_t n,
                               Py_ssize_t stride) noexcept nogil:
    """Sum ``x[0], x[stride], ...`` (n terms) in a fixed pairwise order."""
    cdef Py_ssize_t half, i
    cdef double acc
    if n <= 8:
        acc = 0.0
        for i in range(n):
            acc += x[i * stride]
        return acc
    half = n // 2
    return sum_strided(x, half, stride) + sum_strided(x + half * stride, n - half, stride)


cdef inline void sigmoid_pair(double z, double* p, double* q) noexcept nogil:
    # p = sigmoid(z) and q = 1 - p = sigmoid(-z), each without cancellation,
    # so p * q, the sigmoid's derivative, is accurate for large abs(z).
    cdef double e
    if z >= 0.0:
        e = exp(-z)
        p[0] = 1.0 / (1.0 + e)
        q[0] = e / (1.0 + e)
    else:
        e = exp(z)
        p[0] = e / (1.0 + e)
        q[0] = 1.0 / (1.0 + e)


cdef inline void softmax_at(const floating[:, :, :] logits, Py_ssize_t o,
                            Py_ssize_t i, double* p) noexcept nogil:
    # Shifting by the maximum keeps exp() in range. A NaN logit is never the
    # maximum, but it makes the sum NaN and so every probability of the
    # position NaN, as torch.softmax does.
    #
    # A single +inf logit gets probability 1 and the others 0, the limit as
    # it grows, where inf - inf would give NaN. Several +inf logits have no
    # limit, so they give NaN, as all -inf logits do through -inf - -inf.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t c
    cdef Py_ssize_t n_top = 0
    cdef double zmax = logits[o, 0, i]
    cdef double total = 0.0
    cdef double z

    for c in range(1, n_classes):
        z = logits[o, c, i]
        if z > zmax:
            zmax = z
    if zmax == INFINITY:
        for c in range(n_classes):
            z = logits[o, c, i]
            if z == INFINITY:
                p[c] = 1.0
                n_top += 1
            else:
                # 0 below +inf, NaN for a NaN logit.
                p[c] = exp(z - zmax)
            total += p[c]
        if n_top > 1:
            total = NAN
    else:
        for c in range(n_classes):
            p[c] = exp(logits[o, c, i] - zmax)
            total += p[c]
    for c in range(n_classes):
        p[c] = p[c] / total


cdef void softmax_tile(
    const floating* x,
    Py_ssize_t class_stride,
    Py_ssize_t n_classes,
    floating* prob,
    floating* zmax,
    floating* recip,
) noexcept nogil:
    # Softmax over the classes of TILE positions at once: x[c * class_stride
    # + j] is the logit of class c at position j, and prob[c * TILE + j] its
    # probability. Every loop runs over the TILE positions, so it vectorizes.
    # NaN and -inf logits give NaN probabilities as in softmax_at, and a
    # position whose maximum is +inf is redone by the scalar rule there.
    # The arithmetic is in the logits' precision, so float32 logits fill 4
    # SSE2 lanes, and exp is the branch-free one of fastmath.h.
    cdef Py_ssize_t c, j, n_top
    cdef const floating* xc
    cdef floating* pc
    cdef floating z, e, total

    for j in range(TILE):
        zmax[j] = x[j]
    for c in range(1, n_classes):
        xc = x + c * class_stride
        for j in range(TILE):
            z = xc[j]
            zmax[j] = z if z > zmax[j] else zmax[j]
    for j in range(TILE):
        recip[j] = 0.0
    for c in range(n_classes):
        xc = x + c * class_stride
        pc = prob + c * TILE
        for j in range(TILE):
            e = fast_exp(<floating>(xc[j] - zmax[j]))
            pc[j] = e
            recip[j] = recip[j] + e
    for j in range(TILE):
        recip[j] = 1 / recip[j]
    for c in range(n_classes):
        pc = prob + c * TILE
        for j in range(TILE):
            pc[j] = pc[j] * recip[j]

    # A +inf maximum: probability 1 for a single +inf logit, 0 for the rest
    # (NaN for a NaN logit), and NaN for all when several logits are +inf.
    for j in range(TILE):
        if zmax[j] != INFINITY:
            continue
        n_top = 0
        total = 0.0
        for c in range(n_classes):
            z = x[c * class_stride + j]
            if z == INFINITY:
                e = 1.0
                n_top += 1
            else:
                e = 0.0 if z == z else NAN
            prob[c * TILE + j] = e
            total += e
        if n_top > 1:
            total = NAN
        for c in range(n_classes):
            prob[c * TILE + j] = prob[c * TILE + j] / total


cdef const floating* load_tile(
    const floating[:, :, :] logits,
    Py_ssize_t o,
    Py_ssize_t i,
    Py_ssize_t n,
    floating* packed,
    Py_ssize_t* class_stride,
) noexcept nogil:
    # Returns a pointer to the logits of positions (o, i .. i + n) with unit
    # stride along the positions. A full tile whose positions are contiguous
    # is read in place. Any other tile is copied into packed (class stride
    # TILE) and padded with zeros, so every layout runs the same arithmetic
    # on the same values and gives the same bits.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t c, j
    cdef floating* dst

    if (n == TILE and logits.strides[2] == sizeof(floating)
            and logits.strides[1] % sizeof(floating) == 0):
        class_stride[0] = logits.strides[1] // <Py_ssize_t>sizeof(floating)
        return &logits[o, 0, i]
    for c in range(n_classes):
        dst = packed + c * TILE
        for j in range(n):
            dst[j] = logits[o, c, i + j]
        for j in range(n, TILE):
            dst[j] = 0.0
    class_stride[0] = TILE
    return packed


cdef Py_ssize_t load_targets(
    const int64_t[:, :] target,
    Py_ssize_t n_classes,
    bint has_ignore,
    int64_t ignore_index,
    Py_ssize_t o,
    Py_ssize_t i,
    Py_ssize_t n,
    int64_t* classes,
    double* keep,
) noexcept nogil:
    # Fills the class and the keep flag (1 kept, 0 ignored or padding) of
    # each tile position, with class 0 where the flag is 0 so that gathers
    # stay in range. Returns the offset of the first out-of-range class in
    # the tile, or -1.
    cdef Py_ssize_t j
    cdef int64_t t

    for j in range(n):
        t = target[o, i + j]
        if has_ignore and t == ignore_index:
            classes[j] = 0
            keep[j] = 0.0
        elif t < 0 or t >= n_classes:
            return j
        else:
            classes[j] = t
            keep[j] = 1.0
    for j in range(n, TILE):
        classes[j] = 0
        keep[j] = 0.0
    return -1


cdef struct IndexWork:
    # Per-thread buffers of the class-index kernels, carved from one
    # allocation of index_work_size doubles by index_work.
    double* prob
    double* p_lanes
    double* recip
    double* keep
    double* dot
    int64_t* classes
    void* packed
    void* zmax
    void* grad_tile


cdef inline Py_ssize_t index_work_size(Py_ssize_t n_classes) noexcept nogil:
    # Doubles per thread: prob, p_lanes, packed and grad_tile (n_classes *
    # TILE each), then recip, keep, dot, classes and zmax (TILE each).
    return 4 * n_classes * TILE + 5 * TILE


cdef inline IndexWork index_work(double* base, Py_ssize_t n_classes) noexcept nogil:
    cdef IndexWork w
    cdef Py_ssize_t m = n_classes * TILE
    w.prob = base
    w.p_lanes = base + m
    w.packed = <void*>(base + 2 * m)
    w.grad_tile = <void*>(base + 3 * m)
    w.recip = base + 4 * m
    w.keep = base + 4 * m + TILE
    w.dot = base + 4 * m + 2 * TILE
    w.classes = <int64_t*>(base + 4 * m + 3 * TILE)
    w.zmax = <void*>(base + 4 * m + 4 * TILE)
    return w


cdef Py_ssize_t scan_targets_block(
    const int64_t[:, :] target,
    Py_ssize_t n_classes,
    bint has_ignore,
    int64_t ignore_index,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # Returns the first flat position in [start, stop) whose class index is
    # out of range and not ignore_index, or -1.
    cdef Py_ssize_t inner = target.shape[1]
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t q
    cdef int64_t t

    for q in range(start, stop):
        t = target[o, i]
        if not (has_ignore and t == ignore_index) and (t < 0 or t >= n_classes):
            return q
        i += 1
        if i == inner:
            i = 0
            o += 1
    return -1


cdef void store_tile(
    floating[:, :, :] out,
    Py_ssize_t o,
    Py_ssize_t i,
    Py_ssize_t n,
    const floating* tile,
) noexcept nogil:
    # Writes the first n positions of a tile (class stride TILE) to
    # out[o, :, i .. i + n], by vector copies where those are contiguous.
    cdef Py_ssize_t n_classes = out.shape[1]
    cdef Py_ssize_t c, j, out_stride
    cdef floating* dst
    cdef const floating* src

    if (n == TILE and out.strides[2] == sizeof(floating)
            and out.strides[1] % sizeof(floating) == 0):
        out_stride = out.strides[1] // <Py_ssize_t>sizeof(floating)
        for c in range(n_classes):
            dst = &out[o, 0, i] + c * out_stride
            src = tile + c * TILE
            for j in range(TILE):
                dst[j] = src[j]
    else:
        for c in range(n_classes):
            for j in range(n):
                out[o, c, i + j] = tile[c * TILE + j]


cdef void index_sums_block(
    const floating[:, :, :] logits,
    const int64_t[:, :] target,
    bint has_ignore,
    int64_t ignore_index,
    Py_ssize_t start,
    Py_ssize_t stop,
    double* work,
    double* acc,
    floating[:, :, :] prob_out,
    bint store_prob,
) noexcept nogil:
    # acc holds I, P and Y of the C classes, in that order. Every class
    # index has been checked. With store_prob, the probabilities also go to
    # prob_out (the gradient array), where pass 2 reads them back in place
    # of a second softmax.
    #
    # The block is walked in tiles of at most TILE positions that never cross
    # a row of ``inner`` positions. P of class c is summed into TILE lanes,
    # position j of every tile into lane j, and the lanes are combined in a
    # fixed pairwise order, so the result depends only on the shape.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t inner = logits.shape[2]
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t q = start
    cdef Py_ssize_t n, c, j, class_stride
    cdef IndexWork w = index_work(work, n_classes)
    cdef floating* prob = <floating*>w.prob
    cdef const floating* x
    cdef floating* pc
    cdef double* lanes
    cdef int64_t t

    for j in range(n_classes * TILE):
        w.p_lanes[j] = 0.0
    while q < stop:
        n = min(TILE, min(inner - i, stop - q))
        load_targets(target, n_classes, has_ignore, ignore_index, o, i, n,
                     w.classes, w.keep)
        if n_classes > 0:
            x = load_tile(logits, o, i, n, <floating*>w.packed, &class_stride)
            softmax_tile(x, class_stride, n_classes, prob, <floating*>w.zmax,
                         <floating*>w.recip)
            # The tile of logits has been read, so this store is safe even
            # where prob_out is the logits array itself.
            if store_prob:
                store_tile(prob_out, o, i, n, prob)
            for c in range(n_classes):
                pc = prob + c * TILE
                lanes = w.p_lanes + c * TILE
                for j in range(TILE):
                    lanes[j] = lanes[j] + (pc[j] if w.keep[j] != 0.0 else 0.0)
            for j in range(n):
                if w.keep[j] != 0.0:
                    t = w.classes[j]
                    acc[t] += prob[t * TILE + j]
                    acc[2 * n_classes + t] += 1.0
        q += n
        i += n
        if i == inner:
            i = 0
            o += 1
    for c in range(n_classes):
        acc[n_classes + c] = sum_partials(w.p_lanes + c * TILE, TILE)


cdef void index_grad_block(
    const int64_t[:, :] target,
    bint has_ignore,
    int64_t ignore_index,
    const double* coef_i,
    const double* coef_p,
    floating[:, :, :] grad,
    Py_ssize_t start,
    Py_ssize_t stop,
    double* work,
) noexcept nogil:
    # coef_i and coef_p are this sample's rows, and grad holds the
    # probabilities that pass 1 stored. With g_c = gI_c * y_c + gP_c, the
    # softmax's chain rule gives dloss/dz_j = p_j * (g_j - sum_c p_c g_c),
    # here for a tile of positions at once, with the target's term of the
    # sum first and then the classes in order.
    cdef Py_ssize_t n_classes = grad.shape[1]
    cdef Py_ssize_t inner = grad.shape[2]
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t q = start
    cdef Py_ssize_t n, c, j, class_stride
    cdef IndexWork w = index_work(work, n_classes)
    cdef floating* tile = <floating*>w.grad_tile
    cdef const floating* prob
    cdef floating* gc
    cdef const floating* pc
    cdef double cp, value
    cdef int64_t t

    if n_classes == 0:
        return
    while q < stop:
        n = min(TILE, min(inner - i, stop - q))
        load_targets(target, n_classes, has_ignore, ignore_index, o, i, n,
                     w.classes, w.keep)
        prob = load_tile(grad, o, i, n, <floating*>w.packed, &class_stride)

        for j in range(TILE):
            t = w.classes[j]
            w.dot[j] = prob[t * class_stride + j] * coef_i[t]
        for c in range(n_classes):
            pc = prob + c * class_stride
            cp = coef_p[c]
            for j in range(TILE):
                w.dot[j] = w.dot[j] + pc[j] * cp
        for c in range(n_classes):
            pc = prob + c * class_stride
            gc = tile + c * TILE
            cp = coef_p[c]
            for j in range(TILE):
                value = pc[j] * (cp - w.dot[j])
                value = value if w.keep[j] != 0.0 else 0.0
                gc[j] = <floating>value
        for j in range(n):
            if w.keep[j] != 0.0:
                t = w.classes[j]
                tile[t * TILE + j] = <floating>(
                    prob[t * class_stride + j] * ((coef_p[t] + coef_i[t]) - w.dot[j])
                )
        store_tile(grad, o, i, n, tile)
        q += n
        i += n
        if i == inner:
            i = 0
            o += 1


cdef void dense_sums_block(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    bint use_softmax,
    bint has_ignore,
    double ignore_value,
    Py_ssize_t start,
    Py_ssize_t stop,
    double* p,
    double* acc,
) noexcept nogil:
    # acc holds I, P and Y of the C classes, in that order. With the sigmoid,
    # an element whose target equals ignore_value leaves every sum.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t inner = logits.shape[2]
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t q, c
    cdef double y, prob, unused

    for q in range(start, stop):
        if use_softmax:
            softmax_at(logits, o, i, p)
        for c in range(n_classes):
            y = target[o, c, i]
            if has_ignore and y == ignore_value:
                continue
            if use_softmax:
                prob = p[c]
            else:
                sigmoid_pair(logits[o, c, i], &prob, &unused)
            acc[c] += prob * y
            acc[n_classes + c] += prob
            acc[2 * n_classes + c] += y
        i += 1
        if i == inner:
            i = 0
            o += 1


cdef void dense_grad_block(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    bint use_softmax,
    bint has_ignore,
    double ignore_value,
    const double* coef_i,
    const double* coef_p,
    const char* active,
    floating[:, :, :] grad,
    Py_ssize_t start,
    Py_ssize_t stop,
    double* p,
) noexcept nogil:
    # With the sigmoid, dloss/dz = (gI * y + gP) * p * (1 - p) per element,
    # and 0 for ignored elements and for classes absent from the target, so
    # that their logits, NaN included, do not reach the gradient.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t inner = logits.shape[2]
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t q, c
    cdef double y, prob, comp, dot

    for q in range(start, stop):
        if use_softmax:
            softmax_at(logits, o, i, p)
            dot = 0.0
            for c in range(n_classes):
                dot = dot + p[c] * (coef_i[c] * target[o, c, i] + coef_p[c])
            for c in range(n_classes):
                grad[o, c, i] = <floating>(
                    p[c] * (coef_i[c] * target[o, c, i] + coef_p[c] - dot)
                )
        else:
            for c in range(n_classes):
                y = target[o, c, i]
                if not active[c] or (has_ignore and y == ignore_value):
                    grad[o, c, i] = 0.0
                    continue
                sigmoid_pair(logits[o, c, i], &prob, &comp)
                grad[o, c, i] = <floating>((coef_i[c] * y + coef_p[c]) * prob * comp)
        i += 1
        if i == inner:
            i = 0
            o += 1


cdef double finish_losses(
    const double* acc,
    Py_ssize_t n_samples,
    Py_ssize_t n_classes,
    Py_ssize_t blocks_per_sample,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double* losses,
    double* coef_i,
    double* coef_p,
    char* active,
) noexcept nogil:
    # Combines the block sums of each (sample, class) pair, then fills
    # losses, coef_i, coef_p and active (all n_samples * n_classes long) and
    # returns the sum of the losses.
    #
    # max(S, eps) follows torch.clamp_min: its derivative is 1 where S >= eps
    # and 0 below, so the denominator then stops depending on the sums.
    cdef Py_ssize_t stride = 3 * n_classes
    cdef Py_ssize_t s, c, k
    cdef const double* first
    cdef double inter, p_sum, y_sum, num, den, clamp, d_den

    for s in range(n_samples):
        first = acc + s * blocks_per_sample * stride
        for c in range(n_classes):
            k = s * n_classes + c
            inter = sum_strided(first + c, blocks_per_sample, stride)
            p_sum = sum_strided(first + n_classes + c, blocks_per_sample, stride)
            y_sum = sum_strided(first + 2 * n_classes + c, blocks_per_sample, stride)
            if y_sum <= 0.0:
                # A class absent from the target contributes 0 and no
                # gradient, as in segmentation_models_pytorch (a NaN y_sum
                # is not absent and propagates).
                losses[k] = 0.0
                coef_i[k] = 0.0
                coef_p[k] = 0.0
                active[k] = 0
                continue
            num = a * inter + smooth
            den = k_i * inter + k_p * p_sum + k_y * y_sum + smooth
            clamp = den
            d_den = 1.0
            if den < eps:
                clamp = eps
                d_den = 0.0
            losses[k] = 1.0 - num / clamp
            d_den = d_den * num / (clamp * clamp)
            coef_i[k] = grad_scale * (k_i * d_den - a / clamp)
            coef_p[k] = grad_scale * (k_p * d_den)
            active[k] = 1
    return sum_partials(losses, n_samples * n_classes)


cdef inline Py_ssize_t block_start(Py_ssize_t b, Py_ssize_t blocks_per_sample,
                                   Py_ssize_t per_sample) noexcept nogil:
    # Flat position where block b starts. Every block lies inside one sample.
    cdef Py_ssize_t s = b // blocks_per_sample
    return s * per_sample + (b - s * blocks_per_sample) * BLOCK_SIZE


cdef inline Py_ssize_t block_stop(Py_ssize_t b, Py_ssize_t blocks_per_sample,
                                  Py_ssize_t per_sample) noexcept nogil:
    cdef Py_ssize_t s = b // blocks_per_sample
    return min(block_start(b, blocks_per_sample, per_sample) + BLOCK_SIZE,
               (s + 1) * per_sample)


cdef enum:
    # Return codes of the kernel drivers besides a flat target position.
    CALL_OK = -1
    CALL_NO_MEMORY = -2


cdef Py_ssize_t index_call(
    const floating[:, :, :] logits,
    const int64_t[:, :] target,
    Py_ssize_t n_samples,
    bint has_ignore,
    int64_t ignore_index,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double* losses,
    floating[:, :, :] grad,
    bint write_grad,
    int n_threads,
    double* total,
) noexcept nogil:
    # Runs the class-index kernel (see overlap_index_f64) and returns
    # CALL_OK, CALL_NO_MEMORY or the first flat target position whose class
    # index is out of range. losses may be NULL when only the total is needed.
    #
    # One thread runs plain loops, because entering an OpenMP region costs
    # about a microsecond, as much as the whole work of a small input. Both
    # paths run the same blocks in the same order of combination.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Py_ssize_t per_sample = n_positions // n_samples if n_samples > 0 else 0
    cdef Py_ssize_t blocks_per_sample = n_blocks(per_sample)
    cdef Py_ssize_t total_blocks = n_samples * blocks_per_sample
    cdef Py_ssize_t n_pairs = n_samples * n_classes
    cdef Py_ssize_t stride = 3 * n_classes
    cdef int nt = threads_for(n_positions * n_classes, n_threads)
    cdef Py_ssize_t work_size = index_work_size(n_classes)
    cdef Py_ssize_t b, s, first_bad
    cdef double* buffer
    cdef double* acc
    cdef double* coef_i
    cdef double* coef_p
    cdef double* work
    cdef char* active
    cdef Py_ssize_t* bad

    # One allocation: acc (zeroed), coef_i, coef_p, active, the losses when
    # the caller passes none, the per-block first bad positions, and the
    # per-thread work buffers.
    buffer = <double*>malloc(
        (total_blocks * (stride + 1) + 4 * n_pairs + nt * work_size + 1)
        * sizeof(double)
    )
    if buffer == NULL:
        return CALL_NO_MEMORY
    acc = buffer
    memset(acc, 0, total_blocks * stride * sizeof(double))
    coef_i = acc + total_blocks * stride
    coef_p = coef_i + n_pairs
    active = <char*>(coef_p + n_pairs)
    if losses == NULL:
        losses = coef_p + 2 * n_pairs
    bad = <Py_ssize_t*>(coef_p + 3 * n_pairs)
    work = coef_p + 3 * n_pairs + total_blocks

    # The class indices are checked before pass 1, because pass 1 writes the
    # probabilities into grad, which must stay untouched when an index is
    # out of range.
    if nt == 1:
        for b in range(total_blocks):
            bad[b] = scan_targets_block(
                target, n_classes, has_ignore, ignore_index,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
            )
    else:
        for b in prange(total_blocks, schedule="static", num_threads=nt):
            bad[b] = scan_targets_block(
                target, n_classes, has_ignore, ignore_index,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
            )
    first_bad = CALL_OK
    for b in range(total_blocks):
        if bad[b] >= 0:
            first_bad = bad[b]
            break
    if first_bad >= 0:
        free(buffer)
        return first_bad

    # Pass 1: per-block sums, and the probabilities into grad.
    if nt == 1:
        for b in range(total_blocks):
            index_sums_block(
                logits, target, has_ignore, ignore_index,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                work, acc + b * stride, grad, write_grad,
            )
    else:
        for b in prange(total_blocks, schedule="static", num_threads=nt):
            index_sums_block(
                logits, target, has_ignore, ignore_index,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                work + threadid() * work_size, acc + b * stride, grad, write_grad,
            )

    total[0] = 0.0
    if n_pairs > 0:
        total[0] = finish_losses(
            acc, n_samples, n_classes, blocks_per_sample, a, k_i, k_p, k_y,
            smooth, eps, grad_scale, losses, coef_i, coef_p, active,
        )

    # Pass 2: the gradient, from the coefficients of each block's sample.
    if write_grad and nt == 1:
        for b in range(total_blocks):
            s = b // blocks_per_sample
            index_grad_block(
                target, has_ignore, ignore_index,
                coef_i + s * n_classes, coef_p + s * n_classes, grad,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample), work,
            )
    elif write_grad:
        for b in prange(total_blocks, schedule="static", num_threads=nt):
            s = b // blocks_per_sample
            index_grad_block(
                target, has_ignore, ignore_index,
                coef_i + s * n_classes, coef_p + s * n_classes, grad,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                work + threadid() * work_size,
            )
    free(buffer)
    return CALL_OK


cdef object index_result(Py_ssize_t code, double total):
    if code == CALL_NO_MEMORY:
        raise MemoryError()
    if code >= 0:
        return float("nan"), code
    return total, -1


_INDEX_DOC = """Compute the overlap loss of softmax probabilities and class indices.

    ``logits`` is ``(outer, C, inner)`` and ``target`` ``(outer, inner)``,
    and ``outer`` splits into ``n_samples`` equal runs of rows. Fills
    ``losses`` (``n_samples * C``) unless it is None and, when
    ``write_grad`` is set, ``grad`` (the scale of the ``mean`` is in
    ``grad_scale``). Returns ``(sum of losses, -1)``, or ``(nan, q)``
    without touching ``grad`` when the class index at flat position ``q``
    of the target is out of range.
    """


def overlap_index_f32(
    const float[:, :, :] logits,
    const int64_t[:, :] target,
    Py_ssize_t n_samples,
    bint has_ignore,
    int64_t ignore_index,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double[::1] losses,
    float[:, :, :] grad,
    bint write_grad,
    int n_threads,
):
    cdef double* losses_ptr = NULL
    cdef double total = 0.0
    cdef Py_ssize_t code

    if losses is not None and losses.shape[0] > 0:
        losses_ptr = &losses[0]
    with nogil:
        code = index_call(
            logits, target, n_samples, has_ignore, ignore_index, a, k_i, k_p, k_y,
            smooth, eps, grad_scale, losses_ptr, grad, write_grad, n_threads, &total,
        )
    return index_result(code, total)


def overlap_index_f64(
    const double[:, :, :] logits,
    const int64_t[:, :] target,
    Py_ssize_t n_samples,
    bint has_ignore,
    int64_t ignore_index,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double[::1] losses,
    double[:, :, :] grad,
    bint write_grad,
    int n_threads,
):
    cdef double* losses_ptr = NULL
    cdef double total = 0.0
    cdef Py_ssize_t code

    if losses is not None and losses.shape[0] > 0:
        losses_ptr = &losses[0]
    with nogil:
        code = index_call(
            logits, target, n_samples, has_ignore, ignore_index, a, k_i, k_p, k_y,
            smooth, eps, grad_scale, losses_ptr, grad, write_grad, n_threads, &total,
        )
    return index_result(code, total)


overlap_index_f32.__doc__ = _INDEX_DOC
overlap_index_f64.__doc__ = _INDEX_DOC


cdef Py_ssize_t dense_call(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    Py_ssize_t n_samples,
    bint use_softmax,
    bint has_ignore,
    double ignore_value,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double* losses,
    floating[:, :, :] grad,
    bint write_grad,
    int n_threads,
    double* total,
) noexcept nogil:
    # Runs the dense kernel (see overlap_dense_f64) and returns CALL_OK or
    # CALL_NO_MEMORY, with one thread in plain loops as index_call does.
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Py_ssize_t per_sample = n_positions // n_samples if n_samples > 0 else 0
    cdef Py_ssize_t blocks_per_sample = n_blocks(per_sample)
    cdef Py_ssize_t total_blocks = n_samples * blocks_per_sample
    cdef Py_ssize_t n_pairs = n_samples * n_classes
    cdef Py_ssize_t stride = 3 * n_classes
    cdef int nt = threads_for(n_positions * n_classes, n_threads)
    cdef Py_ssize_t b, s
    cdef double* buffer
    cdef double* acc
    cdef double* coef_i
    cdef double* coef_p
    cdef double* probs
    cdef char* active

    total[0] = 0.0
    if n_classes == 0:
        # No class means no element: nothing to sum and no gradient to write.
        return CALL_OK
    # One allocation: acc (zeroed), coef_i, coef_p, active, the losses when
    # the caller passes none, and the per-thread probabilities.
    buffer = <double*>malloc(
        (total_blocks * stride + 4 * n_pairs + nt * n_classes + 1) * sizeof(double)
    )
    if buffer == NULL:
        return CALL_NO_MEMORY
    acc = buffer
    memset(acc, 0, total_blocks * stride * sizeof(double))
    coef_i = acc + total_blocks * stride
    coef_p = coef_i + n_pairs
    active = <char*>(coef_p + n_pairs)
    if losses == NULL:
        losses = coef_p + 2 * n_pairs
    probs = coef_p + 3 * n_pairs

    # Pass 1: per-block sums.
    if nt == 1:
        for b in range(total_blocks):
            dense_sums_block(
                logits, target, use_softmax, has_ignore, ignore_value,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                probs, acc + b * stride,
            )
    else:
        for b in prange(total_blocks, schedule="static", num_threads=nt):
            dense_sums_block(
                logits, target, use_softmax, has_ignore, ignore_value,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                probs + threadid() * n_classes, acc + b * stride,
            )

    if n_pairs > 0:
        total[0] = finish_losses(
            acc, n_samples, n_classes, blocks_per_sample, a, k_i, k_p, k_y,
            smooth, eps, grad_scale, losses, coef_i, coef_p, active,
        )

    # Pass 2: the gradient, from the coefficients of each block's sample.
    if write_grad and nt == 1:
        for b in range(total_blocks):
            s = b // blocks_per_sample
            dense_grad_block(
                logits, target, use_softmax, has_ignore, ignore_value,
                coef_i + s * n_classes, coef_p + s * n_classes,
                active + s * n_classes, grad,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample), probs,
            )
    elif write_grad:
        for b in prange(total_blocks, schedule="static", num_threads=nt):
            s = b // blocks_per_sample
            dense_grad_block(
                logits, target, use_softmax, has_ignore, ignore_value,
                coef_i + s * n_classes, coef_p + s * n_classes,
                active + s * n_classes, grad,
                block_start(b, blocks_per_sample, per_sample),
                block_stop(b, blocks_per_sample, per_sample),
                probs + threadid() * n_classes,
            )
    free(buffer)
    return CALL_OK


_DENSE_DOC = """Compute the overlap loss of probabilities and a target of their shape.

    ``logits`` and ``target`` are both ``(outer, C, inner)``. A target with
    a zero stride on the class axis serves one-channel binary data. The
    probabilities are a softmax over the class axis (``use_softmax``) or one
    sigmoid per element. Fills ``losses`` unless it is None and, with
    ``write_grad``, ``grad``, and returns the sum of the losses.
    """


def overlap_dense_f32(
    const float[:, :, :] logits,
    const float[:, :, :] target,
    Py_ssize_t n_samples,
    bint use_softmax,
    bint has_ignore,
    double ignore_value,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double[::1] losses,
    float[:, :, :] grad,
    bint write_grad,
    int n_threads,
):
    cdef double* losses_ptr = NULL
    cdef double total = 0.0
    cdef Py_ssize_t code

    if losses is not None and losses.shape[0] > 0:
        losses_ptr = &losses[0]
    with nogil:
        code = dense_call(
            logits, target, n_samples, use_softmax, has_ignore, ignore_value, a,
            k_i, k_p, k_y, smooth, eps, grad_scale, losses_ptr, grad, write_grad,
            n_threads, &total,
        )
    if code == CALL_NO_MEMORY:
        raise MemoryError()
    return total


def overlap_dense_f64(
    const double[:, :, :] logits,
    const double[:, :, :] target,
    Py_ssize_t n_samples,
    bint use_softmax,
    bint has_ignore,
    double ignore_value,
    double a,
    double k_i,
    double k_p,
    double k_y,
    double smooth,
    double eps,
    double grad_scale,
    double[::1] losses,
    double[:, :, :] grad,
    bint write_grad,
    int n_threads,
):
    cdef double* losses_ptr = NULL
    cdef double total = 0.0
    cdef Py_ssize_t code

    if losses is not None and losses.shape[0] > 0:
        losses_ptr = &losses[0]
    with nogil:
        code = dense_call(
            logits, target, n_samples, use_softmax, has_ignore, ignore_value, a,
            k_i, k_p, k_y, smooth, eps, grad_scale, losses_ptr, grad, write_grad,
            n_threads, &total,
        )
    if code == CALL_NO_MEMORY:
        raise MemoryError()
    return total


overlap_dense_f32.__doc__ = _DENSE_DOC
overlap_dense_f64.__doc__ = _DENSE_DOC
