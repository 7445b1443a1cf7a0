# Softmax cross-entropy and softmax focal loss kernels.
#
# Layers, bottom up:
#
# 1. ``_shifted_exps``: one position's max, argmax and ``sum(exp(z - max))``
#    over the other classes, optionally storing each ``exp(z - max)`` in the
#    gradient slots so that the gradient step reads them back from cache
#    instead of calling ``exp`` again.
# 2. ``_ce_label_one``, ``_ce_probs_one``, ``_focal_one``: the loss of one
#    position and its gradient, already multiplied by ``scale``.
# 3. ``_run_block``: the positions of one BLOCK_SIZE block, summing their
#    losses and their target weights in double.
# 4. ``_run`` and the ``def`` kernels: prange over the blocks and the fixed
#    order combination of the block sums (``_common.sum_partials``), so the
#    sums are bit-identical for every thread count.
#
# Every array is an ``(outer, C, inner)`` view (targets and per-position
# losses ``(outer, inner)``): a position is a pair ``(o, i)`` and its flat
# index is ``o * inner + i``, the C-order index into the target's shape. The
# kernels walk positions in that order and each position's classes with the
# class stride, so any strides work, channels-last (class stride 1) and
# class axis 1 (class stride ``inner``) alike.
#
# NOTE: for class axis 1 a tile of neighbouring positions processed class by
# class would let the compiler vectorize the max and the stores. It has not
# been measured against the scalar ``exp`` calls that dominate either way.
#
# Scaling: a kernel multiplies the gradient by ``scale``, which the wrapper
# sets to 1 for "sum" and "none" and to 1 / (sum of the kept targets'
# weights) for "mean". That sum comes from ``scan_labels``, a cheap pass over
# the targets alone (8 bytes per position), which costs less than writing an
# unscaled gradient and reading and writing it again (2 * C values per
# position). The loss is divided in Python.
#
# The wrapper guarantees: C >= 1, strides that are multiples of the item
# size, a C-contiguous weight of length C in the compute dtype, and a grad of
# the logits' shape. Class indices are not trusted: every kernel checks them
# against [0, C) before reading ``weight[y]`` or ``logits[y]`` and records the
# flat index of the first bad one, which the wrapper turns into an error.

from cython.parallel cimport prange
from libc.math cimport exp, expm1, log1p, pow
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

from ._common cimport BLOCK_SIZE, floating, n_blocks, sum_partials, threads_for

cdef enum:
    KIND_CE_LABELS = 0
    KIND_CE_PROBS = 1
    KIND_FOCAL = 2


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


cdef inline double _ce_label_one(
    const floating* z, Py_ssize_t zc, Py_ssize_t n, Py_ssize_t y,
    const floating* w, double w_total, double smoothing, double scale,
    floating* g, Py_ssize_t gc,
) noexcept nogil:
    """Return the cross-entropy of one position with class index ``y``.

    With ``eps = smoothing`` and ``lp = log_softmax(z)`` (PyTorch's formula):
    ``loss = -(1 - eps) * w[y] * lp[y] - eps / C * sum_c w[c] * lp[c]``, and
    ``d loss / d z[k] = A * p[k] - a[k]`` with ``a[k]`` the coefficient of
    ``-lp[k]`` above and ``A = sum_k a[k]``. Classes of zero coefficient are
    left out of the sum, so a ``-inf`` logit there costs nothing.
    """
    cdef Py_ssize_t c, top
    cdef double m, rest, log_rest, lp, loss, smooth, coef, p_y
    cdef double eps_c = smoothing / n
    cdef double a_y = (1.0 - smoothing) * w[y]

    rest = _shifted_exps(z, zc, n, g, gc, &top, &m)
    # Subtract m before adding log1p(rest), which may be far below the
    # rounding step of m.
    log_rest = log1p(rest)
    lp = (z[y * zc] - m) - log_rest

    loss = 0.0
    if a_y != 0.0:
        loss = -a_y * lp
    if smoothing > 0.0:
        smooth = 0.0
        for c in range(n):
            if w[c] != 0.0:
                smooth += w[c] * ((m - z[c * zc]) + log_rest)
        loss += eps_c * smooth

    if g != NULL:
        # g holds exp(z - max); p = g / (1 + rest).
        coef = scale * (a_y + eps_c * w_total) / (1.0 + rest)
        if smoothing > 0.0:
            for c in range(n):
                g[c * gc] = <floating>(coef * g[c * gc] - scale * eps_c * w[c])
        else:
            for c in range(n):
                g[c * gc] = <floating>(coef * g[c * gc])
        # p[y] - 1 = -(1 - p[y]) = expm1(lp), without the cancellation of
        # subtracting 1 from a probability near 1.
        p_y = exp(lp)
        g[y * gc] = <floating>(
            scale * (a_y * expm1(lp) + eps_c * (w_total * p_y - w[y]))
        )
    return loss


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
            # logits, unless label smoothing spreads weight over the others.
            if w_y != 0.0 or (
                pb.kind == KIND_CE_LABELS and pb.smoothing > 0.0
                and y != pb.ignore_index and 0 <= y < n
            ):
                weight_acc += w_y
                if pb.kind == KIND_CE_LABELS:
                    loss = _ce_label_one(
                        z, pb.z_class, n, y, w, pb.weight_total, pb.smoothing,
                        pb.scale, g, pb.g_class,
                    )
                else:
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


cdef tuple _run(const floating* z0, const Problem* pb, Py_ssize_t n_positions,
                int n_threads):
    """Run every block in parallel; return (loss sum, weight sum, first bad)."""
    cdef Py_ssize_t nb = n_blocks(n_positions)
    cdef Py_ssize_t b, start, stop
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

    for b in prange(nb, nogil=True, schedule="static", num_threads=threads):
        start = b * BLOCK_SIZE
        stop = start + BLOCK_SIZE
        if stop > n_positions:
            stop = n_positions
        _run_block(z0, pb, start, stop, &parts[b], &parts[nb + b], &bads[b])

    loss_sum = sum_partials(parts, nb)
    weight_sum = sum_partials(parts + nb, nb)
    for b in range(nb):
        if bads[b] >= 0:
            bad = bads[b]
            break
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


def cross_entropy_labels(
    const floating[:, :, :] logits, const int64_t[:, :] target,
    const floating[:] weight, int64_t ignore_index, double smoothing, double scale,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    int n_threads,
):
    """Cross-entropy with class-index targets over ``(outer, C, inner)`` logits.

    Returns ``(loss_sum, weight_sum, first_bad)``: the sum of the position
    losses, the sum of ``weight[y]`` over the kept positions, and the flat
    index of the first target outside [0, C) that is not ``ignore_index``
    (-1 if none). ``grad`` is written times ``scale`` when ``want_grad``,
    ``losses`` when ``want_losses``; both may be empty otherwise.
    """
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Problem pb

    if n_positions == 0:
        return 0.0, 0.0, -1
    pb = _problem(logits, weight, KIND_CE_LABELS)
    _set_labels(&pb, target, ignore_index)
    _set_grad(&pb, grad, want_grad)
    _set_losses(&pb, losses, want_losses)
    pb.smoothing = smoothing
    pb.scale = scale
    return _run(&logits[0, 0, 0], &pb, n_positions, n_threads)


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


def focal_labels(
    const floating[:, :, :] logits, const int64_t[:, :] target,
    const floating[:] weight, int64_t ignore_index, double gamma, double scale,
    floating[:, :, :] grad, floating[:, :] losses, bint want_grad, bint want_losses,
    int n_threads,
):
    """Softmax focal loss with class-index targets; returns as ``cross_entropy_labels``."""
    cdef Py_ssize_t n_positions = logits.shape[0] * logits.shape[2]
    cdef Problem pb

    if n_positions == 0:
        return 0.0, 0.0, -1
    pb = _problem(logits, weight, KIND_FOCAL)
    _set_labels(&pb, target, ignore_index)
    _set_grad(&pb, grad, want_grad)
    _set_losses(&pb, losses, want_losses)
    pb.gamma = gamma
    pb.scale = scale
    return _run(&logits[0, 0, 0], &pb, n_positions, n_threads)


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


def scan_labels(const int64_t[:, :] target, const floating[:] weight,
                int64_t ignore_index, int n_threads):
    """Return ``(weight_sum, first_bad)`` over ``(outer, inner)`` class indices.

    The sum visits the positions in the same blocks as the loss kernels, so
    it equals their weight sum bit for bit.
    """
    cdef Py_ssize_t outer = target.shape[0]
    cdef Py_ssize_t inner = target.shape[1]
    cdef Py_ssize_t n_positions = outer * inner
    cdef Py_ssize_t nb = n_blocks(n_positions)
    cdef Py_ssize_t n = weight.shape[0]
    cdef Py_ssize_t b, start, stop
    cdef Py_ssize_t bad = -1
    cdef Py_ssize_t y_outer, y_inner
    cdef double weight_sum
    cdef int threads = threads_for(n_positions, n_threads)
    cdef const int64_t* y0
    cdef const floating* w = &weight[0]
    cdef double* parts = NULL
    cdef Py_ssize_t* bads = NULL

    if nb == 0:
        return 0.0, -1
    y0 = &target[0, 0]
    y_outer = _elements(target.strides[0], sizeof(int64_t))
    y_inner = _elements(target.strides[1], sizeof(int64_t))
    parts = <double*>malloc(nb * sizeof(double))
    bads = <Py_ssize_t*>malloc(nb * sizeof(Py_ssize_t))
    if parts == NULL or bads == NULL:
        free(parts)
        free(bads)
        raise MemoryError()

    for b in prange(nb, nogil=True, schedule="static", num_threads=threads):
        start = b * BLOCK_SIZE
        stop = start + BLOCK_SIZE
        if stop > n_positions:
            stop = n_positions
        _scan_block(y0, y_outer, y_inner, inner, w, n, ignore_index,
                    start, stop, &parts[b], &bads[b])

    weight_sum = sum_partials(parts, nb)
    for b in range(nb):
        if bads[b] >= 0:
            bad = bads[b]
            break
    free(parts)
    free(bads)
    return weight_sum, bad
