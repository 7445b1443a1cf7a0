# Softmax cross-entropy and softmax focal loss kernels.
#
# The class-index cross-entropy, bottom up:
#
# 1. ``_ce_tile``: a tile of up to MAX_TILE positions, laid out class-major
#    (``z[c * zc + j]``), in passes that loop over the classes outside and
#    the positions inside, so that gcc vectorizes every inner loop with
#    unit stride: the max, ``exp(z - max)`` with the vectorizable
#    ``fast_exp`` of fastmath.h (stored in the gradient), the
#    per-position finish (``_ce_position``, with ``fl_log1p``), and the
#    gradient.
# 2. ``_run_block_tiles``: the positions of one BLOCK_SIZE block, cut into
#    tiles. With class axis 1 the positions of one row are contiguous and a
#    tile is read and written in place; any other layout (channels-last,
#    strided) is copied into a class-major buffer and back, so every
#    layout runs the same arithmetic and gives the same bits.
#
# The class-probability cross-entropy and the focal loss still go one
# position at a time: ``_shifted_exps`` (max, argmax and the sum of
# ``exp(z - max)`` over the other classes, with libm's exp), then
# ``_ce_probs_one`` or ``_focal_one``, in ``_run_block``.
#
# ``_run`` and the ``def`` kernels: the blocks in parallel (prange), or in a
# plain loop when one thread suffices, and the fixed-order combination of
# the block sums (``_common.sum_partials``), so the sums are bit-identical
# for every thread count.
#
# Every array is an ``(outer, C, inner)`` view (targets and per-position
# losses ``(outer, inner)``): a position is a pair ``(o, i)`` and its flat
# index is ``o * inner + i``, the C-order index into the target's shape.
# ``(outer, C, 1)`` arrays are treated as ``(1, C, outer)``, which has the
# same flat indices, so F-order ``(N, C)`` logits also read in place.
#
# Scaling: a kernel multiplies the gradient by ``scale``, 1 for "sum" and
# "none" and 1 / (sum of the kept targets' weights) for "mean". That sum
# comes from ``_scan``, a pass over the targets alone (8 bytes per
# position) inside the same call, which costs less than writing an unscaled
# gradient and reading and writing it again (2 * C values per position).
# The loss is divided in Python.
#
# The wrapper guarantees: C >= 1, strides that are multiples of the item
# size, a C-contiguous weight of length C in the compute dtype, and a grad of
# the logits' shape. Class indices are not trusted: every kernel checks them
# against [0, C) before reading ``weight[y]`` or ``logits[y]`` and records the
# flat index of the first bad one, which the wrapper turns into an error.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, expm1, log1p, pow
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

from ._common cimport BLOCK_SIZE, floating, n_blocks, sum_partials, threads_for
from ._fastmath cimport fast_exp, fl_log1p

cnp.import_array()

cdef enum:
    KIND_CE_LABELS = 0
    KIND_CE_PROBS = 1
    KIND_FOCAL = 2

# How the class-index cross-entropy walks its arrays. Both go through
# _ce_tile, so they give the same bits.
cdef enum:
    LAYOUT_PACKED = 0   # a tile is copied to a class-major buffer and back
    LAYOUT_TILES = 1    # positions contiguous: tiles are read in place


cdef struct Problem:
    # Sizes and element strides of the (outer, C, inner) views.
    Py_ssize_t n_classes
    Py_ssize_t inner
    Py_ssize_t z_outer, z_class, z_inner
    const int64_t* labels
    Py_ssize_t y_outer, y_inner
    const void* probs
    Py_ssize_t t_outer, t_class, t_inner
    const void* weight
    void* grad
    Py_ssize_t g_outer, g_class, g_inner
    void* losses
    Py_ssize_t l_outer, l_inner
    int kind
    int layout
    int64_t ignore_index
    double smoothing
    double gamma
    double scale
    double weight_total
    bint want_grad
    bint want_losses


cdef inline double _shifted_exps(
    const floating* z, Py_ssize_t zc, Py_ssize_t n,
    floating* g, Py_ssize_t gc, Py_ssize_t* top_out, double* max_out,
) noexcept nogil:
    """Return ``sum(exp(z[c] - max))`` over every class but the argmax.

    Leaving out the argmax, whose term is exactly 1, lets the caller take
    ``log1p`` of the result: ``1 - p_t`` stays accurate as ``p_t`` nears 1.
    NaN logits never win the max but make the sum NaN, so NaN propagates.
    When ``g`` is not NULL, ``g[c]`` receives ``exp(z[c] - max)``.
    """
    cdef Py_ssize_t c, top = 0
    cdef double m = z[0]
    cdef double e
    cdef double rest = 0.0

    for c in range(1, n):
        if z[c * zc] > m:
            m = z[c * zc]
            top = c

    if g != NULL:
        for c in range(top):
            e = exp(z[c * zc] - m)
            g[c * gc] = <floating>e
            rest += e
        g[top * gc] = 1
        for c in range(top + 1, n):
            e = exp(z[c * zc] - m)
            g[c * gc] = <floating>e
            rest += e
    else:
        for c in range(top):
            rest += exp(z[c * zc] - m)
        for c in range(top + 1, n):
            rest += exp(z[c * zc] - m)
    top_out[0] = top
    max_out[0] = m
    return rest


cdef inline double _ce_probs_one(
    const floating* z, Py_ssize_t zc, Py_ssize_t n,
    const floating* t, Py_ssize_t tc,
    const floating* w, double smoothing, double scale,
    floating* g, Py_ssize_t gc,
) noexcept nogil:
    """Return the cross-entropy of one position with class probabilities ``t``.

    ``loss = -sum_c a[c] * lp[c]`` with ``a[c] = w[c] * ((1 - eps) * t[c] +
    eps / C)``, and ``d loss / d z[k] = A * p[k] - a[k]``, ``A = sum a``.
    PyTorch computes ``0 * -inf = nan`` for a ``-inf`` logit whose ``a[c]``
    is 0; this kernel leaves such a class out and returns the limit.
    """
    cdef Py_ssize_t c, top
    cdef double m, rest, log_rest, a, a_total, loss, coef
    cdef double keep = 1.0 - smoothing
    cdef double eps_c = smoothing / n

    rest = _shifted_exps(z, zc, n, g, gc, &top, &m)
    log_rest = log1p(rest)

    loss = 0.0
    a_total = 0.0
    for c in range(n):
        a = w[c] * (keep * t[c * tc] + eps_c)
        a_total += a
        if a != 0.0:
            loss += a * ((m - z[c * zc]) + log_rest)

    if g != NULL:
        coef = scale * a_total / (1.0 + rest)
        for c in range(n):
            a = w[c] * (keep * t[c * tc] + eps_c)
            g[c * gc] = <floating>(coef * g[c * gc] - scale * a)
    return loss


cdef inline double _focal_one(
    const floating* z, Py_ssize_t zc, Py_ssize_t n, Py_ssize_t y,
    double w_y, double gamma, double scale, floating* g, Py_ssize_t gc,
) noexcept nogil:
    """Return the softmax focal loss of one position with class index ``y``.

    ``loss = -w[y] * q**gamma * lp`` with ``lp = log p_t`` and
    ``q = 1 - p_t = -expm1(lp)``. Differentiating,
    ``d loss / d z[k] = w[y] * F * (p[k] - [k == y])`` with
    ``F = q**gamma - gamma * p_t * lp * q**(gamma - 1)
        = q**gamma * (1 + gamma * p_t * (-lp) / q)``.
    The second form never evaluates ``q**(gamma - 1)``, which is infinite
    at ``q = 0`` for ``gamma < 1``: there ``-lp / q`` tends to 1, and
    ``F = q**gamma * (1 + gamma)`` (0 for ``gamma > 0``, 1 for ``gamma = 0``,
    which makes ``gamma = 0`` the cross-entropy). At ``p_t = 0`` (a ``-inf``
    target logit) the factor ``p_t * (-lp)`` tends to 0 and ``F = 1``.
    """
    cdef Py_ssize_t c, top
    cdef double m, rest, log_rest, lp, p_t, q, q_gamma, factor, coef

    rest = _shifted_exps(z, zc, n, g, gc, &top, &m)
    # Subtract m before adding log1p(rest), which may be far below the
    # rounding step of m.
    log_rest = log1p(rest)
    lp = (z[y * zc] - m) - log_rest
    p_t = exp(lp)
    q = -expm1(lp)
    q_gamma = 1.0 if gamma == 0.0 else pow(q, gamma)

    if g != NULL:
        if q > 0.0 and p_t > 0.0:
            factor = q_gamma * (1.0 + gamma * p_t * (-lp) / q)
        elif q == 0.0:
            factor = q_gamma * (1.0 + gamma * p_t)
        else:
            # p_t == 0, or NaN, which the products below pass on.
            factor = q_gamma
        coef = scale * w_y * factor / (1.0 + rest)
        for c in range(n):
            g[c * gc] = <floating>(coef * g[c * gc])
        g[y * gc] = <floating>(-scale * w_y * factor * q)
    return w_y * q_gamma * (-lp)



# Positions per tile of the cross-entropy kernel: enough for the inner
# loops to run many vector iterations, few enough that a tile's logits and
# gradient (about TILE_ITEMS values each) stay in the L2 cache between the
# passes. MIN_TILE wins over TILE_ITEMS for more than 1024 classes.
cdef enum:
    MAX_TILE = 256
    MIN_TILE = 16
    TILE_ITEMS = 16384


cdef inline void _ce_position(
    double rest, double m, double z_y, double e_y, bint y_is_top, double w_y,
    double w_total, double smoothing, double eps_c, double smooth, double scale,
    double* loss_out, double* coef_out, double* grad_y_out,
) noexcept nogil:
    """Finish one kept position of the class-index cross-entropy.

    With ``eps = smoothing`` and ``lp = log_softmax(z)`` (PyTorch's formula):
    ``loss = -(1 - eps) * w[y] * lp[y] - eps / C * sum_c w[c] * lp[c]``, and
    ``d loss / d z[k] = A * p[k] - a[k]`` with ``a[k]`` the coefficient of
    ``-lp[k]`` above and ``A = sum_k a[k]``. Classes of zero coefficient are
    left out of the sum, so a ``-inf`` logit there costs nothing.

    ``rest`` is ``sum(exp(z - m))`` over every class but the first argmax,
    ``e_y = exp(z_y - m)`` (1 for the argmax) and ``smooth`` is
    ``sum_c w[c] * (m - z[c])`` over the classes of nonzero weight. Stores
    the loss, the factor ``coef`` that turns ``exp(z - m)`` into the scaled
    gradient ``A * p[k]``, and the scaled gradient at ``y``.
    """
    cdef double log_rest = fl_log1p(rest)
    cdef double lp = (z_y - m) - log_rest
    cdef double denom = 1.0 + rest
    cdef double a_y = (1.0 - smoothing) * w_y
    cdef double p_y = e_y / denom
    cdef double p_y_minus_1
    cdef double loss = -a_y * lp if a_y != 0.0 else 0.0

    loss += eps_c * (smooth + w_total * log_rest) if smoothing > 0.0 else 0.0
    # p_y - 1 without cancellation: at the argmax it is -rest / (1 + rest),
    # elsewhere p_y <= 1/2. The term 0 * (z_y - m) makes a +inf argmax
    # (inf - inf) give NaN, as the loss does.
    p_y_minus_1 = -rest / denom + 0.0 * (z_y - m) if y_is_top else p_y - 1.0
    loss_out[0] = loss
    coef_out[0] = scale * (a_y + eps_c * w_total) / denom
    grad_y_out[0] = scale * (a_y * p_y_minus_1 + eps_c * (w_total * p_y - w_y))


cdef Py_ssize_t _ce_tile(
    const floating* z, Py_ssize_t zc, floating* g, Py_ssize_t gc,
    const int64_t* labels, Py_ssize_t y_outer, Py_ssize_t y_inner, Py_ssize_t inner,
    Py_ssize_t count, Py_ssize_t first, const Problem* pb,
    double* loss_acc, double* weight_acc,
    floating* l, Py_ssize_t l_outer, Py_ssize_t l_inner,
) noexcept nogil:
    """Process the ``count`` positions from flat index ``first`` on.

    ``z[c * zc + j]`` is the logit of class ``c`` at the ``j``-th position
    of the tile, and ``g`` (NULL for no gradient) has the same layout.
    Labels and per-position losses (``l``, NULL unless requested) are read
    and written at their own ``(outer, inner)`` strides. Each pass runs
    over the classes and inside over the positions, so the inner loops
    have unit stride and vectorize: the max, the exps and their sum, the
    per-position finish, and the gradient. Losses and weights are added to
    ``loss_acc`` and ``weight_acc`` in position order. Returns the flat
    index of the first bad class index, or -1.
    """
    cdef Py_ssize_t n = pb.n_classes
    cdef const floating* w = <const floating*>pb.weight
    cdef double smoothing = pb.smoothing
    cdef double eps_c = smoothing / n
    cdef double scale = pb.scale
    cdef Py_ssize_t j, c, o, i, bad = -1
    cdef int64_t y
    cdef int ci
    cdef floating v, e, wc, mj
    cdef double w_y, loss_j, coef_j, grad_y_j
    cdef int is_max
    cdef floating m[MAX_TILE]
    cdef floating z_y[MAX_TILE]
    cdef floating e_y[MAX_TILE]
    cdef floating coef[MAX_TILE]
    cdef floating grad_y[MAX_TILE]
    cdef double rest[MAX_TILE]
    cdef double smooth[MAX_TILE]
    cdef double w_ys[MAX_TILE]
    cdef double losses[MAX_TILE]
    cdef int n_max[MAX_TILE]
    cdef int y_is_max[MAX_TILE]
    cdef int cls[MAX_TILE]
    cdef int keep[MAX_TILE]
    cdef const floating* zrow
    cdef floating* grow

    # Targets: validate, look up weights. cls is -1 where nothing is kept.
    o = first // inner
    i = first - o * inner
    for j in range(count):
        y = labels[o * y_outer + i * y_inner]
        i += 1
        if i == inner:
            i = 0
            o += 1
        if y == pb.ignore_index or y < 0 or y >= n:
            if y != pb.ignore_index and bad < 0:
                bad = first + j
            w_y = 0.0
            keep[j] = 0
        else:
            w_y = w[y]
            # A position of zero weight contributes nothing, whatever its
            # logits, unless label smoothing spreads weight over the others.
            keep[j] = w_y != 0.0 or smoothing > 0.0
        cls[j] = <int>y if keep[j] else -1
        w_ys[j] = w_y
        weight_acc[0] += w_y

    # Max over the classes. A NaN never wins; a NaN logit makes the sum of
    # exps NaN below, so the max found does not matter then.
    for j in range(count):
        m[j] = z[j]
    for c in range(1, n):
        zrow = z + c * zc
        for j in range(count):
            v = zrow[j]
            mj = m[j]
            m[j] = v if v > mj else mj

    # exp(z - m), stored in the gradient. rest sums it over every class
    # below the max, and n_max counts the classes at the max: each of those
    # has exp(0) = 1 (also for an infinite max, where z - m is NaN), and all
    # but one of them belong in rest. Leaving that one out of the sum keeps
    # 1 - p accurate when p is near 1.
    for j in range(count):
        rest[j] = 0.0
        smooth[j] = 0.0
        n_max[j] = 0
    for c in range(n):
        zrow = z + c * zc
        # Two copies of one loop, because a store under "if g != NULL"
        # inside the loop keeps gcc from vectorizing it.
        if g != NULL:
            grow = g + c * gc
            for j in range(count):
                v = zrow[j]
                e = fast_exp(v - m[j])
                is_max = v == m[j]
                n_max[j] += is_max
                grow[j] = 1 if is_max else e
                e = 0 if is_max else e
                rest[j] += e
        else:
            for j in range(count):
                v = zrow[j]
                e = fast_exp(v - m[j])
                is_max = v == m[j]
                n_max[j] += is_max
                e = 0 if is_max else e
                rest[j] += e
        if smoothing > 0.0 and w[c] != 0.0:
            wc = w[c]
            for j in range(count):
                smooth[j] += wc * (<double>m[j] - zrow[j])
    # A NaN max (n_max = 0) makes rest NaN, as the NaN terms already do.
    for j in range(count):
        rest[j] += n_max[j] - 1
    # The target's logit, and its exp as the pass above computed it.
    for j in range(count):
        z_y[j] = z[cls[j] * zc + j] if cls[j] >= 0 else 0
    for j in range(count):
        e = fast_exp(z_y[j] - m[j])
        y_is_max[j] = z_y[j] == m[j]
        e_y[j] = 1 if y_is_max[j] else e

    for j in range(count):
        _ce_position(
            rest[j], m[j], z_y[j], e_y[j], y_is_max[j], w_ys[j], pb.weight_total,
            smoothing, eps_c, smooth[j], scale, &loss_j, &coef_j, &grad_y_j,
        )
        losses[j] = loss_j if keep[j] else 0.0
        coef[j] = <floating>coef_j
        grad_y[j] = <floating>grad_y_j

    # Sequential in position order, as the per-position kernel adds.
    for j in range(count):
        loss_acc[0] += losses[j]
    if l != NULL:
        o = first // inner
        i = first - o * inner
        for j in range(count):
            l[o * l_outer + i * l_inner] = <floating>losses[j]
            i += 1
            if i == inner:
                i = 0
                o += 1

    if g != NULL:
        for c in range(n):
            grow = g + c * gc
            ci = <int>c
            if smoothing > 0.0:
                wc = <floating>(scale * eps_c * w[c])
            else:
                wc = 0
            for j in range(count):
                e = coef[j] * grow[j] - wc
                e = grad_y[j] if cls[j] == ci else e
                grow[j] = e if keep[j] else 0
    return bad


cdef void _run_block_tiles(
    const floating* z0, const Problem* pb, Py_ssize_t start, Py_ssize_t stop,
    double* loss_out, double* weight_out, Py_ssize_t* bad_out,
) noexcept nogil:
    """Process positions ``start:stop`` of the cross-entropy in tiles.

    With LAYOUT_TILES a tile stays inside one row of positions, which are
    contiguous, and _ce_tile reads the logits and writes the gradient in
    place. With LAYOUT_PACKED each tile's logits are first copied to a
    class-major buffer, and its gradient copied back from another; the copy
    costs less than the exps, and every layout then runs the same
    arithmetic. Sets ``bad_out`` to -2 when the buffers cannot be allocated.
    """
    cdef Py_ssize_t n = pb.n_classes
    cdef Py_ssize_t tile = TILE_ITEMS // n
    cdef Py_ssize_t f = start
    cdef Py_ssize_t o, i, j, c, count, b
    cdef Py_ssize_t bad = -1
    cdef double loss_acc = 0.0
    cdef double weight_acc = 0.0
    cdef bint packed = pb.layout == LAYOUT_PACKED
    cdef const floating* z
    cdef const floating* zp
    cdef floating* g = NULL
    cdef floating* gp
    cdef floating* l = NULL
    cdef floating* z_buf = NULL
    cdef floating* g_buf = NULL

    tile = MAX_TILE if tile > MAX_TILE else (MIN_TILE if tile < MIN_TILE else tile)
    if tile > stop - start:
        tile = stop - start
    if packed:
        z_buf = <floating*>malloc(tile * n * sizeof(floating))
        g_buf = <floating*>malloc(tile * n * sizeof(floating))
        if z_buf == NULL or g_buf == NULL:
            free(z_buf)
            free(g_buf)
            bad_out[0] = -2
            return

    while f < stop:
        o = f // pb.inner
        i = f - o * pb.inner
        count = tile
        if count > stop - f:
            count = stop - f
        if not packed and count > pb.inner - i:
            count = pb.inner - i
        if pb.want_losses:
            l = <floating*>pb.losses + o * pb.l_outer + i * pb.l_inner

        if packed:
            _pack_tile(z0, pb.z_outer, pb.z_class, pb.z_inner, pb.inner, n, f, count,
                       z_buf, tile)
            b = _ce_tile(
                z_buf, tile, g_buf if pb.want_grad else NULL, tile,
                pb.labels, pb.y_outer, pb.y_inner, pb.inner, count, f, pb,
                &loss_acc, &weight_acc, <floating*>pb.losses, pb.l_outer, pb.l_inner,
            )
            if pb.want_grad:
                _unpack_tile(g_buf, tile, <floating*>pb.grad, pb.g_outer, pb.g_class,
                             pb.g_inner, pb.inner, n, f, count)
        else:
            if pb.want_grad:
                g = <floating*>pb.grad + o * pb.g_outer + i
            b = _ce_tile(
                z0 + o * pb.z_outer + i, pb.z_class, g, pb.g_class,
                pb.labels, pb.y_outer, pb.y_inner, pb.inner, count, f, pb,
                &loss_acc, &weight_acc, <floating*>pb.losses, pb.l_outer, pb.l_inner,
            )
        if bad < 0:
            bad = b
        f += count

    free(z_buf)
    free(g_buf)
    loss_out[0] = loss_acc
    weight_out[0] = weight_acc
    bad_out[0] = bad


cdef inline void _pack_tile(
    const floating* z0, Py_ssize_t z_outer, Py_ssize_t z_class, Py_ssize_t z_inner,
    Py_ssize_t inner, Py_ssize_t n, Py_ssize_t first, Py_ssize_t count,
    floating* buf, Py_ssize_t tile,
) noexcept nogil:
    """Copy the logits of positions ``first:first + count`` to ``buf[c * tile + j]``."""
    cdef Py_ssize_t o = first // inner
    cdef Py_ssize_t i = first - o * inner
    cdef Py_ssize_t j, c
    cdef const floating* zp

    for j in range(count):
        zp = z0 + o * z_outer + i * z_inner
        for c in range(n):
            buf[c * tile + j] = zp[c * z_class]
        i += 1
        if i == inner:
            i = 0
            o += 1


cdef inline void _unpack_tile(
    const floating* buf, Py_ssize_t tile, floating* g0, Py_ssize_t g_outer,
    Py_ssize_t g_class, Py_ssize_t g_inner, Py_ssize_t inner, Py_ssize_t n,
    Py_ssize_t first, Py_ssize_t count,
) noexcept nogil:
    """Copy ``buf[c * tile + j]`` to the gradient of positions ``first:first + count``."""
    cdef Py_ssize_t o = first // inner
    cdef Py_ssize_t i = first - o * inner
    cdef Py_ssize_t j, c
    cdef floating* gp

    for j in range(count):
        gp = g0 + o * g_outer + i * g_inner
        for c in range(n):
            gp[c * g_class] = buf[c * tile + j]
        i += 1
        if i == inner:
            i = 0
            o += 1


cdef void _run_block(
    const floating* z0, const Problem* pb, Py_ssize_t start, Py_ssize_t stop,
    double* loss_out, double* weight_out, Py_ssize_t* bad_out,
) noexcept nogil:
    """Process positions ``start:stop`` and store their sums and first bad index."""
    cdef Py_ssize_t n = pb.n_classes
    cdef Py_ssize_t o = start // pb.inner
    cdef Py_ssize_t i = start - o * pb.inner
    cdef Py_ssize_t f, c, y
    cdef Py_ssize_t bad = -1
    cdef double loss, w_y
    cdef double loss_acc = 0.0
    cdef double weight_acc = 0.0
    cdef const floating* w = <const floating*>pb.weight
    cdef const floating* t0 = <const floating*>pb.probs
    cdef floating* g0 = <floating*>pb.grad
    cdef floating* l0 = <floating*>pb.losses
    cdef const floating* z
    cdef floating* g = NULL

    for f in range(start, stop):
        z = z0 + o * pb.z_outer + i * pb.z_inner
        if pb.want_grad:
            g = g0 + o * pb.g_outer + i * pb.g_inner
        loss = 0.0

        if pb.kind == KIND_CE_PROBS:
            loss = _ce_probs_one(
                z, pb.z_class, n, t0 + o * pb.t_outer + i * pb.t_inner, pb.t_class,
                w, pb.smoothing, pb.scale, g, pb.g_class,
            )
        else:
            y = pb.labels[o * pb.y_outer + i * pb.y_inner]
            if y == pb.ignore_index or y < 0 or y >= n:
                if y != pb.ignore_index and bad < 0:
                    bad = f
                w_y = 0.0
            else:
                w_y = w[y]
            # A position of zero weight contributes nothing, whatever its
            # logits. (The cross-entropy, where label smoothing spreads
            # weight over the other classes, runs in _ce_tile.)
            if w_y != 0.0:
                weight_acc += w_y
                loss = _focal_one(
                    z, pb.z_class, n, y, w_y, pb.gamma, pb.scale, g, pb.g_class
                )
            elif g != NULL:
                for c in range(n):
                    g[c * pb.g_class] = 0

        loss_acc += loss
        if pb.want_losses:
            l0[o * pb.l_outer + i * pb.l_inner] = <floating>loss
        i += 1
        if i == pb.inner:
            i = 0
            o += 1

    loss_out[0] = loss_acc
    weight_out[0] = weight_acc
    bad_out[0] = bad


cdef inline void _run_one_block(
    const floating* z0, const Problem* pb, Py_ssize_t n_positions, Py_ssize_t b,
    Py_ssize_t nb, double* parts, Py_ssize_t* bads,
) noexcept nogil:
    cdef Py_ssize_t start = b * BLOCK_SIZE
    cdef Py_ssize_t stop = start + BLOCK_SIZE

    if stop > n_positions:
        stop = n_positions
    if pb.kind == KIND_CE_LABELS:
        _run_block_tiles(z0, pb, start, stop, &parts[b], &parts[nb + b], &bads[b])
    else:
        _run_block(z0, pb, start, stop, &parts[b], &parts[nb + b], &bads[b])


cdef tuple _run(const floating* z0, const Problem* pb, Py_ssize_t n_positions,
                int n_threads):
    """Run every block in parallel; return (loss sum, weight sum, first bad)."""
    cdef Py_ssize_t nb = n_blocks(n_positions)
    cdef Py_ssize_t b
    cdef Py_ssize_t bad = -1
    cdef double loss_sum, weight_sum
    cdef int threads = threads_for(n_positions * pb.n_classes, n_threads)
    cdef double* parts = NULL
    cdef Py_ssize_t* bads = NULL

    if nb == 0:
        return 0.0, 0.0, -1
    parts = <double*>malloc(2 * nb * sizeof(double))
    bads = <Py_ssize_t*>malloc(nb * sizeof(Py_ssize_t))
    if parts == NULL or bads == NULL:
        free(parts)
        free(bads)
        raise MemoryError()

    if threads == 1:
        # Same blocks, same order, without the cost of starting a team.
        with nogil:
            for b in range(nb):
                _run_one_block(z0, pb, n_positions, b, nb, parts, bads)
    else:
        for b in prange(nb, nogil=True, schedule="static", num_threads=threads):
            _run_one_block(z0, pb, n_positions, b, nb, parts, bads)

    loss_sum = sum_partials(parts, nb)
    weight_sum = sum_partials(parts + nb, nb)
    for b in range(nb):
        if bads[b] == -2:
            free(parts)
            free(bads)
            raise MemoryError()
        if bads[b] >= 0 and bad < 0:
            bad = bads[b]
    free(parts)
    free(bads)
    return loss_sum, weight_sum, bad


cdef Py_ssize_t _elements(Py_ssize_t stride_bytes, Py_ssize_t itemsize) noexcept:
    return stride_bytes // itemsize


cdef void _set_grad(Problem* pb, floating[:, :, :] grad, bint want_grad):
    pb.want_grad = want_grad and grad.shape[0] * grad.shape[1] * grad.shape[2] > 0
    if pb.want_grad:
        pb.grad = <void*>&grad[0, 0, 0]
        pb.g_outer = _elements(grad.strides[0], sizeof(floating))
        pb.g_class = _elements(grad.strides[1], sizeof(floating))
        pb.g_inner = _elements(grad.strides[2], sizeof(floating))


cdef void _set_losses(Problem* pb, floating[:, :] losses, bint want_losses):
    pb.want_losses = want_losses and losses.shape[0] * losses.shape[1] > 0
    if pb.want_losses:
        pb.losses = <void*>&losses[0, 0]
        pb.l_outer = _elements(losses.strides[0], sizeof(floating))
        pb.l_inner = _elements(losses.strides[1], sizeof(floating))


cdef Problem _problem(const floating[:, :, :] logits, const floating[:] weight, int kind):
    cdef Problem pb
    cdef Py_ssize_t c

    pb.n_classes = logits.shape[1]
    pb.inner = logits.shape[2]
    pb.z_outer = _elements(logits.strides[0], sizeof(floating))
    pb.z_class = _elements(logits.strides[1], sizeof(floating))
    pb.z_inner = _elements(logits.strides[2], sizeof(floating))
    pb.labels = NULL
    pb.probs = NULL
    pb.weight = <const void*>&weight[0]
    pb.grad = NULL
    pb.losses = NULL
    pb.want_grad = False
    pb.want_losses = False
    pb.kind = kind
    pb.layout = LAYOUT_PACKED
    pb.ignore_index = 0
    pb.smoothing = 0.0
    pb.gamma = 0.0
    pb.scale = 1.0
    pb.weight_total = 0.0
    for c in range(pb.n_classes):
        pb.weight_total += weight[c]
    return pb


cdef void _set_labels(Problem* pb, const int64_t[:, :] target, int64_t ignore_index):
    pb.labels = &target[0, 0]
    pb.y_outer = _elements(target.strides[0], sizeof(int64_t))
    pb.y_inner = _elements(target.strides[1], sizeof(int64_t))
    pb.ignore_index = ignore_index


cdef void _flatten_single_row(Problem* pb, Py_ssize_t outer) noexcept:
    """Treat ``(outer, C, 1)`` arrays as ``(1, C, outer)``.

    The flat position index is the same either way, and the inner stride
    becomes the one between positions, which for F-order ``(N, C)`` logits is
    1: the tile kernel then reads them in place with unit stride.
    """
    if pb.inner != 1:
        return
    pb.inner = outer
    pb.z_inner = pb.z_outer
    pb.g_inner = pb.g_outer
    pb.y_inner = pb.y_outer
    pb.l_inner = pb.l_outer
    pb.t_inner = pb.t_outer


cdef void _choose_layout(Problem* pb) noexcept:
    """Read the logits in place when positions are contiguous, else pack."""
    pb.layout = LAYOUT_PACKED
    if pb.inner > 1 and pb.z_inner == 1 and (not pb.want_grad or pb.g_inner == 1):
        pb.layout = LAYOUT_TILES


cdef tuple _run_labels(
    const floating[:, :, :] logits, const int64_t[:, :] target,
    const floating[:] weight, int64_t ignore_index, int kind, double param,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    bint mean, bint check_first, int n_threads,
):
    """Shared body of the class-index kernels; ``param`` is smoothing or gamma."""
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Problem pb
    cdef double weight_sum
    cdef Py_ssize_t bad

    if n_positions == 0:
        return 0.0, 0.0, -1
    if logits.shape[1] > 2147483647:
        # _ce_tile keeps class indices in 32-bit lanes.
        raise ValueError(f"logits must have at most 2**31 - 1 classes, got {logits.shape[1]}")
    pb = _problem(logits, weight, kind)
    _set_labels(&pb, target, ignore_index)
    _set_grad(&pb, grad, want_grad)
    _set_losses(&pb, losses, want_losses)
    if kind == KIND_CE_LABELS:
        pb.smoothing = param
    else:
        pb.gamma = param
    _flatten_single_row(&pb, logits.shape[0])
    _choose_layout(&pb)

    # The mean's gradient needs its divisor before the first write, so a
    # pass over the targets alone (8 bytes per position) finds it. It also
    # validates them, which keeps a caller's grad_out untouched on error.
    if (mean and pb.want_grad) or check_first:
        _scan(&weight[0], &pb, n_positions, n_threads, &weight_sum, &bad)
        if bad >= 0:
            return 0.0, weight_sum, bad
        if mean and pb.want_grad:
            if weight_sum == 0.0:
                # Nothing is kept: the wrapper zeroes the gradient.
                return 0.0, 0.0, -1
            pb.scale = 1.0 / weight_sum
    return _run(&logits[0, 0, 0], &pb, n_positions, n_threads)


def cross_entropy_labels(
    const floating[:, :, :] logits, const int64_t[:, :] target,
    const floating[:] weight, int64_t ignore_index, double smoothing,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    bint mean, bint check_first, int n_threads,
):
    """Cross-entropy with class-index targets over ``(outer, C, inner)`` logits.

    Returns ``(loss_sum, weight_sum, first_bad)``: the sum of the position
    losses, the sum of ``weight[y]`` over the kept positions, and the flat
    index of the first target outside [0, C) that is not ``ignore_index``
    (-1 if none). ``grad`` is written when ``want_grad`` and ``losses`` when
    ``want_losses``; both may be empty otherwise. With ``mean`` the gradient
    is divided by the weight sum; when that sum is 0 nothing is computed and
    ``(0.0, 0.0, -1)`` is returned, so the caller must zero ``grad``. With
    ``check_first`` (implied by ``mean`` with a gradient) a bad target is
    found before anything is written, and the loss sum is then 0.
    """
    return _run_labels(
        logits, target, weight, ignore_index, KIND_CE_LABELS, smoothing, grad,
        losses, want_grad, want_losses, mean, check_first, n_threads,
    )


def focal_labels(
    const floating[:, :, :] logits, const int64_t[:, :] target,
    const floating[:] weight, int64_t ignore_index, double gamma,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    bint mean, bint check_first, int n_threads,
):
    """Softmax focal loss with class-index targets; as ``cross_entropy_labels``."""
    return _run_labels(
        logits, target, weight, ignore_index, KIND_FOCAL, gamma, grad, losses,
        want_grad, want_losses, mean, check_first, n_threads,
    )


def cross_entropy_probs(
    const floating[:, :, :] logits, const floating[:, :, :] target,
    const floating[:] weight, double smoothing, double scale,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    int n_threads,
):
    """Cross-entropy with class-probability targets of the logits' layout.

    Returns ``(loss_sum, n_positions, -1)``; ``grad`` and ``losses`` as in
    ``cross_entropy_labels``.
    """
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Problem pb
    cdef tuple result

    if n_positions == 0:
        return 0.0, 0.0, -1
    pb = _problem(logits, weight, KIND_CE_PROBS)
    pb.probs = <const void*>&target[0, 0, 0]
    pb.t_outer = _elements(target.strides[0], sizeof(floating))
    pb.t_class = _elements(target.strides[1], sizeof(floating))
    pb.t_inner = _elements(target.strides[2], sizeof(floating))
    _set_grad(&pb, grad, want_grad)
    _set_losses(&pb, losses, want_losses)
    pb.smoothing = smoothing
    pb.scale = scale
    result = _run(&logits[0, 0, 0], &pb, n_positions, n_threads)
    return result[0], float(n_positions), -1


cdef void _scan_block(
    const int64_t* y0, Py_ssize_t y_outer, Py_ssize_t y_inner, Py_ssize_t inner,
    const floating* w, Py_ssize_t n, int64_t ignore_index,
    Py_ssize_t start, Py_ssize_t stop, double* weight_out, Py_ssize_t* bad_out,
) noexcept nogil:
    cdef Py_ssize_t o = start // inner
    cdef Py_ssize_t i = start - o * inner
    cdef Py_ssize_t f
    cdef int64_t y
    cdef Py_ssize_t bad = -1
    cdef double acc = 0.0

    for f in range(start, stop):
        y = y0[o * y_outer + i * y_inner]
        if y != ignore_index:
            if 0 <= y < n:
                acc += w[y]
            elif bad < 0:
                bad = f
        i += 1
        if i == inner:
            i = 0
            o += 1
    weight_out[0] = acc
    bad_out[0] = bad


cdef inline void _scan_one_block(
    const floating* w, const Problem* pb, Py_ssize_t n_positions, Py_ssize_t b,
    double* parts, Py_ssize_t* bads,
) noexcept nogil:
    cdef Py_ssize_t start = b * BLOCK_SIZE
    cdef Py_ssize_t stop = start + BLOCK_SIZE

    if stop > n_positions:
        stop = n_positions
    _scan_block(
        pb.labels, pb.y_outer, pb.y_inner, pb.inner, w, pb.n_classes,
        pb.ignore_index, start, stop, &parts[b], &bads[b],
    )


cdef int _scan(
    const floating* w, const Problem* pb, Py_ssize_t n_positions, int n_threads,
    double* weight_sum_out, Py_ssize_t* bad_out,
) except -1:
    """Store the kept targets' weight sum and the first bad target's index.

    The sum visits the positions in the same blocks as the loss kernels, so
    it equals their weight sum bit for bit.
    """
    cdef Py_ssize_t nb = n_blocks(n_positions)
    cdef Py_ssize_t b
    cdef int threads = threads_for(n_positions, n_threads)
    cdef double* parts = <double*>malloc(nb * sizeof(double))
    cdef Py_ssize_t* bads = <Py_ssize_t*>malloc(nb * sizeof(Py_ssize_t))

    if parts == NULL or bads == NULL:
        free(parts)
        free(bads)
        raise MemoryError()
    if threads == 1:
        with nogil:
            for b in range(nb):
                _scan_one_block(w, pb, n_positions, b, parts, bads)
    else:
        for b in prange(nb, nogil=True, schedule="static", num_threads=threads):
            _scan_one_block(w, pb, n_positions, b, parts, bads)
    weight_sum_out[0] = sum_partials(parts, nb)
    bad_out[0] = -1
    for b in range(nb):
        if bads[b] >= 0:
            bad_out[0] = bads[b]
            break
    free(parts)
    free(bads)
    return 0


def is_c_contiguous(cnp.ndarray a):
    """Return whether ``a`` is C-contiguous.

    Reading ``a.flags.c_contiguous`` builds a flags object, which costs
    more than a 16-element cross-entropy.
    """
    return cnp.PyArray_IS_C_CONTIGUOUS(a)
