# Sigmoid losses: binary cross-entropy with logits and the sigmoid focal loss.
#
# Layers:
#   1. Scalar functions return one element's loss and store its derivative
#      with respect to the logit. ``bce_plain`` (no weights) works in the
#      precision of the input, float32 included, on the branch-free exp and
#      log1p of fastmath.h. ``bce_point`` (with pos_weight) returns the loss
#      in double. ``focal_base``, ``focal_power`` and ``focal_finish`` form
#      the focal loss in the precision of the input, one phase each.
#   2. Block functions walk one BLOCK_SIZE block, write the per-element loss
#      and gradient where asked, and return the block's sum.
#      ``bce_contig_block`` (C-contiguous, no weights) runs in loops that
#      vectorize, and ``bce_strided_block`` computes the same elements on
#      views of any layout. Both add element start + k into lane k % LANES
#      of the input precision and widen the lanes to double once per block,
#      so both give the same bits. ``focal_contig_block`` and
#      ``focal_strided_block`` do the same for the focal loss, and
#      ``bce_weighted_block`` walks 3-D views in double.
#   3. The ``def`` kernels run the blocks under ``prange`` and combine the
#      block sums with ``sum_partials``, so the total is bit-identical for
#      every thread count.
#
# The Python wrapper has already cast every array to one float dtype, checked
# the shapes, broadcast ``weight`` and ``pos_weight`` to zero-stride views,
# and turned all arrays into 3-D views (``as_3d_views``) that visit the
# elements in the same order. ``grad_scale`` carries the ``mean`` scaling
# (1/n) into the gradient, and the wrapper divides the returned sum itself.

from cython.parallel cimport prange

from libc.math cimport fabs, pow
from libc.stdlib cimport malloc, free

from ._common cimport floating, BLOCK_SIZE, n_blocks, threads_for, sum_partials
from ._fastmath cimport fl_exp, fl_expf, fl_log1p, fl_log1pf

cdef extern from "<math.h>" nogil:
    float fabsf(float x)

cdef enum:
    # Accumulators per block: element start + k goes to lane k % LANES, so
    # the strided and the contiguous loops add in the same order. A constant
    # trip count of LANES lets gcc vectorize the contiguous loop over whole
    # groups. A float32 lane adds BLOCK_SIZE / LANES = 64 losses, which
    # bounds its relative rounding error by 64 * 2**-24 (4e-6) for
    # nonnegative losses, before the lanes are widened to double.
    # NOTE: float32 losses that add up past 3.4e38 within one lane make it
    # inf, even where the mean of the double sum would be finite.
    LANES = 64


cdef inline double bce_from_exp(floating z, floating e, double y, double pos_weight,
                                double* dz) noexcept nogil:
    # loss = (1 - y) * softplus(z) + pos_weight * y * softplus(-z), which is
    # -[pos_weight * y * log(sigmoid(z)) + (1 - y) * log(1 - sigmoid(z))],
    # given e = exp(-|z|).
    #
    # No branch, so that loops over this function vectorize: with
    # tail = log1p(e), softplus(z) =
    # max(z, 0) + tail and softplus(-z) = max(-z, 0) + tail, and sigmoid is
    # 1 / (1 + e) on the side of z and e / (1 + e) on the other, neither
    # with cancellation. float32 logits get these terms in float, 4 SIMD
    # lanes to double's 2. The products with 1 - y and pos_weight * y are
    # taken in double, so that a large target or weight cannot overflow
    # float where the double result is finite.
    cdef floating tail, near, far, zero = 0
    if floating is float:
        tail = fl_log1pf(e)
    else:
        tail = fl_log1p(e)
    near = 1 / (1 + e)
    far = e * near
    cdef floating sp_pos = (z if z > zero else zero) + tail
    cdef floating sp_neg = (-z if -z > zero else zero) + tail
    cdef bint positive = z >= zero
    cdef floating p = near if positive else far
    cdef floating q = far if positive else near
    cdef double a = 1.0 - y
    cdef double b = pos_weight * y

    dz[0] = (a * p if p != zero else 0.0) - (b * q if q != zero else 0.0)
    # a * softplus with 0 * inf taken as 0, its limit, so an infinite logit
    # on the side that its label does not weigh costs nothing.
    return (0.0 if a == 0.0 else a * sp_pos) + (0.0 if b == 0.0 else b * sp_neg)


cdef inline floating exp_abs(floating z) noexcept nogil:
    # exp(-|z|) in the precision of z.
    if floating is float:
        return fl_expf(-fabsf(z))
    else:
        return fl_exp(-fabs(z))


cdef inline double bce_point(floating z, double y, double pos_weight,
                             double* dz) noexcept nogil:
    return bce_from_exp(z, exp_abs(z), y, pos_weight, dz)


cdef inline floating bce_plain(floating z, floating e, floating y,
                               floating* dz) noexcept nogil:
    # The loss and derivative of bce_from_exp with pos_weight 1, all in the
    # precision of z, given e = exp(-|z|). With tail = log1p(e), softplus(z)
    # = max(z, 0) + tail and softplus(-z) = softplus(z) - z, so
    #   loss = (1 - y) * softplus(z) + y * softplus(-z) = slope * z + tail,
    # where slope is 1 - y for z >= 0 and -y for z < 0. For y in [0, 1] both
    # terms are nonnegative, so the sum loses nothing to cancellation, and
    # slope * z is the only product: where it overflows, the loss itself
    # exceeds the float range (tail is at most log 2). A zero slope at an
    # infinite z gives 0, the limit, not 0 * inf. An infinite y gives the
    # limit -y * z, as PyTorch's (1 - y) * z - log(sigmoid(z)) does, and NaN
    # at z = 0. Each product of the derivative is dropped where its sigmoid
    # factor is 0, so an infinite y keeps the derivative's limit -y where
    # exp(-|z|) underflows.
    # Typed constants: a bare 1 is a double literal in the generated C,
    # which would take the float32 arithmetic to double.
    cdef floating zero = 0, one = 1
    cdef floating tail, near, far, p, q, slope, a
    if floating is float:
        tail = fl_log1pf(e)
    else:
        tail = fl_log1p(e)
    near = one / (one + e)
    far = e * near
    cdef bint positive = z >= zero
    p = near if positive else far
    q = far if positive else near
    a = one - y
    slope = a if positive else -y

    dz[0] = (a * p if p != zero else zero) - (y * q if q != zero else zero)
    return (slope * z if slope != zero else zero) + tail


cdef enum:
    # How focal_power forms m**gamma. The general case calls libm's pow,
    # which keeps its loop scalar; the others vectorize.
    POWER_ZERO = 0
    POWER_ONE = 1
    POWER_TWO = 2
    POWER_GENERAL = 3


cdef inline floating focal_base(floating z, floating e, floating y,
                                floating* near_out) noexcept nogil:
    # m = 1 - p_t = p * (1 - y) + q * y from p = sigmoid(z) and
    # q = sigmoid(-z), given e = exp(-|z|). Formed without subtracting from
    # 1, m keeps its relative accuracy as p_t nears 1. Stores 1 / (1 + e) in
    # near_out for focal_finish.
    cdef floating zero = 0, one = 1
    cdef floating near = one / (one + e)
    cdef floating far = e * near
    cdef bint positive = z >= zero
    cdef floating p = near if positive else far
    cdef floating q = far if positive else near

    near_out[0] = near
    return p * (one - y) + q * y


cdef inline floating focal_power(floating m, double gamma, int power) noexcept nogil:
    # m**gamma. m * m is correctly rounded, as pow(m, 2) is.
    if power == POWER_ZERO:
        return 1
    if power == POWER_ONE:
        return m
    if power == POWER_TWO:
        return m * m
    return <floating>pow(m, gamma)


cdef inline floating focal_finish(
    floating z, floating e, floating near, floating y, floating m, floating focal,
    floating gamma, bint balance, floating alpha_pos, floating alpha_neg,
    floating* dz,
) noexcept nogil:
    # torchvision.ops.sigmoid_focal_loss: alpha_t * ce * m**gamma, from the
    # e = exp(-|z|), 1 / (1 + e), m = 1 - p_t and m**gamma of the calls
    # above, in the precision of z and without branches. ce is bce_plain's
    # loss. The derivative is
    #   (p (1 - y) - q y) m**gamma + gamma ce m**gamma (1 - 2y) r,
    # with r = p q / m, which lies in [0, 1] for y in [0, 1] because m is
    # then a convex combination of p and q. So m**(gamma - 1) never appears,
    # and the gradient stays finite for 0 < gamma < 1. For y in [0, 1], m
    # rounds to 0 only where p q does too, and r is taken as 0 there. A
    # target outside [0, 1] can make m negative, and r keeps its sign. The second term is dropped where gamma or
    # r is 0, which keeps an infinite ce (a logit of -inf on a positive)
    # from making 0 * inf. alpha_t = alpha_pos * y + alpha_neg * (1 - y),
    # or 1 when balance is off.
    cdef floating zero = 0, one = 1, two = 2
    cdef floating tail, far, p, q, a, slope, ce, r, grad, extra, alpha_t
    cdef bint positive = z >= zero
    if floating is float:
        tail = fl_log1pf(e)
    else:
        tail = fl_log1p(e)
    far = e * near
    p = near if positive else far
    q = far if positive else near
    a = one - y
    slope = a if positive else -y
    ce = ((slope * z if slope != zero else zero) + tail) + (y - y)

    r = (p * q) / (m if m != zero else one)
    r = r if m != zero else zero
    grad = (p * a - q * y) * focal
    extra = gamma * ce * focal * (one - two * y) * r
    grad = grad + (extra if gamma != zero and r != zero else zero)
    alpha_t = alpha_pos * y + alpha_neg * a
    alpha_t = alpha_t if balance else one
    dz[0] = alpha_t * grad
    return alpha_t * ce * focal


cdef double bce_weighted_block(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    const floating[:, :, :] weight,
    const floating[:, :, :] pos_weight,
    bint has_weight,
    bint has_pos_weight,
    floating[:, :, :] loss_out,
    bint write_loss,
    floating[:, :, :] grad,
    bint write_grad,
    double grad_scale,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # One block of BCE with weight or pos_weight, per element in double.
    cdef Py_ssize_t n1 = logits.shape[1]
    cdef Py_ssize_t n2 = logits.shape[2]
    cdef Py_ssize_t i0 = start // (n1 * n2)
    cdef Py_ssize_t i1 = (start - i0 * n1 * n2) // n2
    cdef Py_ssize_t i2 = start - (i0 * n1 + i1) * n2
    cdef Py_ssize_t k
    cdef double lanes[LANES]
    cdef double w, pw, loss, dz

    for k in range(LANES):
        lanes[k] = 0.0
    for k in range(start, stop):
        w = weight[i0, i1, i2] if has_weight else 1.0
        pw = pos_weight[i0, i1, i2] if has_pos_weight else 1.0
        loss = w * bce_point(logits[i0, i1, i2], target[i0, i1, i2], pw, &dz)
        dz = w * dz
        # A zero weight drops the element whatever its values, NaN too.
        loss = 0.0 if w == 0.0 else loss
        dz = 0.0 if w == 0.0 else dz
        lanes[(k - start) % LANES] += loss
        if write_loss:
            loss_out[i0, i1, i2] = <floating>loss
        if write_grad:
            grad[i0, i1, i2] = <floating>(grad_scale * dz)
        i2 += 1
        if i2 == n2:
            i2 = 0
            i1 += 1
            if i1 == n1:
                i1 = 0
                i0 += 1
    return sum_partials(lanes, LANES)


cdef inline double sum_lanes(const floating* lanes) noexcept nogil:
    # The LANES accumulators of a block, widened to double and added in
    # sum_partials' fixed order.
    cdef double wide[LANES]
    cdef int j

    for j in range(LANES):
        wide[j] = lanes[j]
    return sum_partials(wide, LANES)


cdef double bce_strided_block(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    floating[:, :, :] loss_out,
    bint write_loss,
    floating[:, :, :] grad,
    bint write_grad,
    double grad_scale,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # One block of BCE without weights on views of any layout: bce_plain
    # per element, and element start + k added to lane k % LANES, as
    # bce_contig_block does.
    cdef Py_ssize_t n1 = logits.shape[1]
    cdef Py_ssize_t n2 = logits.shape[2]
    cdef Py_ssize_t i0 = start // (n1 * n2)
    cdef Py_ssize_t i1 = (start - i0 * n1 * n2) // n2
    cdef Py_ssize_t i2 = start - (i0 * n1 + i1) * n2
    cdef Py_ssize_t k
    cdef floating lanes[LANES]
    cdef floating scale = <floating>grad_scale
    cdef floating z, loss, dz

    for k in range(LANES):
        lanes[k] = 0
    for k in range(start, stop):
        z = logits[i0, i1, i2]
        loss = bce_plain(z, exp_abs(z), target[i0, i1, i2], &dz)
        lanes[(k - start) % LANES] += loss
        if write_loss:
            loss_out[i0, i1, i2] = loss
        if write_grad:
            grad[i0, i1, i2] = scale * dz
        i2 += 1
        if i2 == n2:
            i2 = 0
            i1 += 1
            if i1 == n1:
                i1 = 0
                i0 += 1
    return sum_lanes(lanes)


cdef double bce_contig_block(
    const floating* logits,
    const floating* target,
    floating* loss_out,
    floating* grad,
    double grad_scale,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # bce_strided_block for C-contiguous data: the same elements in the
    # same lanes, so the same bits, from loops that vectorize. loss_out and
    # grad may be NULL.
    cdef const floating* x = logits + start
    cdef const floating* y = target + start
    cdef const floating* x_full_stop = x + ((stop - start) & ~(<Py_ssize_t>(LANES - 1)))
    cdef floating* g = grad + start if grad != NULL else NULL
    cdef floating* o = loss_out + start if loss_out != NULL else NULL
    cdef floating lanes[LANES]
    cdef floating e[LANES]
    cdef floating scale = <floating>grad_scale
    cdef floating loss, dz
    cdef Py_ssize_t k, n_tail
    cdef int j

    for j in range(LANES):
        lanes[j] = 0
    # gcc 12.2 does not vectorize a loop in which fl_exp feeds fl_log1p, so
    # each group takes its exps in a loop of its own. Each variant writes
    # only the outputs it has, which keeps NULL tests out of the loops.
    if g != NULL and o == NULL:
        while x < x_full_stop:
            for j in range(LANES):
                e[j] = exp_abs(x[j])
            for j in range(LANES):
                lanes[j] += bce_plain(x[j], e[j], y[j], &dz)
                g[j] = scale * dz
            x += LANES
            y += LANES
            g += LANES
    elif g == NULL and o == NULL:
        while x < x_full_stop:
            for j in range(LANES):
                e[j] = exp_abs(x[j])
            for j in range(LANES):
                lanes[j] += bce_plain(x[j], e[j], y[j], &dz)
            x += LANES
            y += LANES
    elif g == NULL:
        while x < x_full_stop:
            for j in range(LANES):
                e[j] = exp_abs(x[j])
            for j in range(LANES):
                loss = bce_plain(x[j], e[j], y[j], &dz)
                lanes[j] += loss
                o[j] = loss
            x += LANES
            y += LANES
            o += LANES
    else:
        while x < x_full_stop:
            for j in range(LANES):
                e[j] = exp_abs(x[j])
            for j in range(LANES):
                loss = bce_plain(x[j], e[j], y[j], &dz)
                lanes[j] += loss
                o[j] = loss
                g[j] = scale * dz
            x += LANES
            y += LANES
            o += LANES
            g += LANES
    n_tail = (logits + stop) - x
    for k in range(n_tail):
        loss = bce_plain(x[k], exp_abs(x[k]), y[k], &dz)
        lanes[k] += loss
        if o != NULL:
            o[k] = loss
        if g != NULL:
            g[k] = scale * dz
    return sum_lanes(lanes)


cdef struct FocalParams:
    # gamma and the balance weights alpha_t = alpha_pos * y + alpha_neg * (1 - y),
    # both 1 when balance is off, and the POWER_* way to form m**gamma.
    double gamma
    int power
    bint balance
    double alpha_pos
    double alpha_neg


cdef inline floating focal_element(floating z, floating y, const FocalParams* fp,
                                   floating* dz) noexcept nogil:
    # One element through the same calls, in the same order, as the groups
    # of focal_contig_block.
    cdef floating e = exp_abs(z)
    cdef floating near, m

    m = focal_base(z, e, y, &near)
    return focal_finish(
        z, e, near, y, m, focal_power(m, fp.gamma, fp.power), <floating>fp.gamma,
        fp.balance, <floating>fp.alpha_pos, <floating>fp.alpha_neg, dz,
    )


cdef double focal_strided_block(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    const FocalParams* fp,
    floating[:, :, :] loss_out,
    bint write_loss,
    floating[:, :, :] grad,
    bint write_grad,
    double grad_scale,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # One block of the focal loss on views of any layout, element start + k
    # in lane k % LANES, as in focal_contig_block.
    cdef Py_ssize_t n1 = logits.shape[1]
    cdef Py_ssize_t n2 = logits.shape[2]
    cdef Py_ssize_t i0 = start // (n1 * n2)
    cdef Py_ssize_t i1 = (start - i0 * n1 * n2) // n2
    cdef Py_ssize_t i2 = start - (i0 * n1 + i1) * n2
    cdef Py_ssize_t k
    cdef floating lanes[LANES]
    cdef floating scale = <floating>grad_scale
    cdef floating loss, dz

    for k in range(LANES):
        lanes[k] = 0
    for k in range(start, stop):
        loss = focal_element(logits[i0, i1, i2], target[i0, i1, i2], fp, &dz)
        lanes[(k - start) % LANES] += loss
        if write_loss:
            loss_out[i0, i1, i2] = loss
        if write_grad:
            grad[i0, i1, i2] = scale * dz
        i2 += 1
        if i2 == n2:
            i2 = 0
            i1 += 1
            if i1 == n1:
                i1 = 0
                i0 += 1
    return sum_lanes(lanes)


cdef double focal_contig_block(
    const floating* logits,
    const floating* target,
    const FocalParams* fp,
    floating* loss_out,
    floating* grad,
    double grad_scale,
    Py_ssize_t start,
    Py_ssize_t stop,
) noexcept nogil:
    # focal_strided_block for C-contiguous data, in loops that vectorize
    # except for the pow of a general gamma. Each group of LANES elements
    # goes through the phases of focal_element one loop at a time, and its
    # losses and gradients are copied out in loops of their own. loss_out
    # and grad may be NULL.
    cdef const floating* x = logits + start
    cdef const floating* y = target + start
    cdef const floating* x_full_stop = x + ((stop - start) & ~(<Py_ssize_t>(LANES - 1)))
    cdef floating* g = grad + start if grad != NULL else NULL
    cdef floating* o = loss_out + start if loss_out != NULL else NULL
    cdef floating lanes[LANES]
    cdef floating e[LANES]
    cdef floating near[LANES]
    cdef floating m[LANES]
    cdef floating focal[LANES]
    cdef floating losses[LANES]
    cdef floating dz[LANES]
    cdef floating scale = <floating>grad_scale
    cdef floating gamma = <floating>fp.gamma
    cdef floating alpha_pos = <floating>fp.alpha_pos
    cdef floating alpha_neg = <floating>fp.alpha_neg
    cdef bint balance = fp.balance
    cdef int power = fp.power
    cdef floating loss, dz_one
    cdef Py_ssize_t k, n_tail
    cdef int j

    for j in range(LANES):
        lanes[j] = 0
    while x < x_full_stop:
        for j in range(LANES):
            e[j] = exp_abs(x[j])
        for j in range(LANES):
            m[j] = focal_base(x[j], e[j], y[j], &near[j])
        # The cases of focal_power, one loop each.
        if power == POWER_TWO:
            for j in range(LANES):
                focal[j] = m[j] * m[j]
        elif power == POWER_ZERO:
            for j in range(LANES):
                focal[j] = 1
        elif power == POWER_ONE:
            for j in range(LANES):
                focal[j] = m[j]
        else:
            for j in range(LANES):
                focal[j] = <floating>pow(m[j], fp.gamma)
        for j in range(LANES):
            losses[j] = focal_finish(
                x[j], e[j], near[j], y[j], m[j], focal[j], gamma, balance,
                alpha_pos, alpha_neg, &dz[j],
            )
            lanes[j] += losses[j]
        if o != NULL:
            for j in range(LANES):
                o[j] = losses[j]
            o += LANES
        if g != NULL:
            for j in range(LANES):
                g[j] = scale * dz[j]
            g += LANES
        x += LANES
        y += LANES
    n_tail = (logits + stop) - x
    for k in range(n_tail):
        loss = focal_element(x[k], y[k], fp, &dz_one)
        lanes[k] += loss
        if o != NULL:
            o[k] = loss
        if g != NULL:
            g[k] = scale * dz_one
    return sum_lanes(lanes)


def bce_with_logits(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    const floating[:, :, :] weight,
    const floating[:, :, :] pos_weight,
    bint has_weight,
    bint has_pos_weight,
    floating[:, :, :] loss_out,
    bint write_loss,
    floating[:, :, :] grad,
    bint write_grad,
    double grad_scale,
    int n_threads,
):
    """Return the sum of the weighted per-element BCE losses.

    ``weight`` and ``pos_weight`` are read only when their flag is set, and
    ``loss_out`` and ``grad`` are written only when theirs is, so callers may
    pass any array of the dtype in their place.
    """
    cdef Py_ssize_t n = logits.shape[0] * logits.shape[1] * logits.shape[2]
    cdef Py_ssize_t nb = n_blocks(n)
    cdef int nt = threads_for(n, n_threads)
    cdef double* partials
    cdef Py_ssize_t b
    cdef double total
    cdef bint contiguous
    cdef const floating* x = NULL
    cdef const floating* y = NULL
    cdef floating* o = NULL
    cdef floating* g = NULL

    if nb == 0:
        return 0.0
    partials = <double*>malloc(nb * sizeof(double))
    if partials == NULL:
        raise MemoryError()
    contiguous = (
        not has_weight and not has_pos_weight
        and logits.is_c_contig() and target.is_c_contig()
        and (not write_loss or loss_out.is_c_contig())
        and (not write_grad or grad.is_c_contig())
    )
    if contiguous:
        x = &logits[0, 0, 0]
        y = &target[0, 0, 0]
        o = &loss_out[0, 0, 0] if write_loss else NULL
        g = &grad[0, 0, 0] if write_grad else NULL
    # With one thread the blocks run without an OpenMP region, because even
    # a team of one costs libgomp about 4000 instructions per call.
    with nogil:
        if contiguous:
            if nt == 1:
                for b in range(nb):
                    partials[b] = bce_contig_block(
                        x, y, o, g, grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
            else:
                for b in prange(nb, schedule="static", num_threads=nt):
                    partials[b] = bce_contig_block(
                        x, y, o, g, grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
        elif has_weight or has_pos_weight:
            if nt == 1:
                for b in range(nb):
                    partials[b] = bce_weighted_block(
                        logits, target, weight, pos_weight, has_weight, has_pos_weight,
                        loss_out, write_loss, grad, write_grad, grad_scale,
                        b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
            else:
                for b in prange(nb, schedule="static", num_threads=nt):
                    partials[b] = bce_weighted_block(
                        logits, target, weight, pos_weight, has_weight, has_pos_weight,
                        loss_out, write_loss, grad, write_grad, grad_scale,
                        b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
        else:
            if nt == 1:
                for b in range(nb):
                    partials[b] = bce_strided_block(
                        logits, target, loss_out, write_loss, grad, write_grad,
                        grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
            else:
                for b in prange(nb, schedule="static", num_threads=nt):
                    partials[b] = bce_strided_block(
                        logits, target, loss_out, write_loss, grad, write_grad,
                        grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
        total = sum_partials(partials, nb)
    free(partials)
    return total


def sigmoid_focal(
    const floating[:, :, :] logits,
    const floating[:, :, :] target,
    double alpha,
    double gamma,
    floating[:, :, :] loss_out,
    bint write_loss,
    floating[:, :, :] grad,
    bint write_grad,
    double grad_scale,
    int n_threads,
):
    """Return the sum of the per-element sigmoid focal losses.

    ``alpha < 0`` turns the class balance off.
    """
    cdef Py_ssize_t n = logits.shape[0] * logits.shape[1] * logits.shape[2]
    cdef Py_ssize_t nb = n_blocks(n)
    cdef int nt = threads_for(n, n_threads)
    cdef double* partials
    cdef Py_ssize_t b
    cdef double total
    cdef bint contiguous
    cdef FocalParams fp
    cdef const floating* x = NULL
    cdef const floating* y = NULL
    cdef floating* o = NULL
    cdef floating* g = NULL

    fp.gamma = gamma
    if gamma == 0.0:
        fp.power = POWER_ZERO
    elif gamma == 1.0:
        fp.power = POWER_ONE
    elif gamma == 2.0:
        fp.power = POWER_TWO
    else:
        fp.power = POWER_GENERAL
    fp.balance = alpha >= 0.0
    fp.alpha_pos = alpha if fp.balance else 1.0
    fp.alpha_neg = 1.0 - alpha if fp.balance else 1.0

    if nb == 0:
        return 0.0
    partials = <double*>malloc(nb * sizeof(double))
    if partials == NULL:
        raise MemoryError()
    contiguous = (
        logits.is_c_contig() and target.is_c_contig()
        and (not write_loss or loss_out.is_c_contig())
        and (not write_grad or grad.is_c_contig())
    )
    if contiguous:
        x = &logits[0, 0, 0]
        y = &target[0, 0, 0]
        o = &loss_out[0, 0, 0] if write_loss else NULL
        g = &grad[0, 0, 0] if write_grad else NULL
    # With one thread the blocks run without an OpenMP region, because even
    # a team of one costs libgomp about 4000 instructions per call.
    with nogil:
        if contiguous:
            if nt == 1:
                for b in range(nb):
                    partials[b] = focal_contig_block(
                        x, y, &fp, o, g, grad_scale, b * BLOCK_SIZE,
                        min((b + 1) * BLOCK_SIZE, n),
                    )
            else:
                for b in prange(nb, schedule="static", num_threads=nt):
                    partials[b] = focal_contig_block(
                        x, y, &fp, o, g, grad_scale, b * BLOCK_SIZE,
                        min((b + 1) * BLOCK_SIZE, n),
                    )
        else:
            if nt == 1:
                for b in range(nb):
                    partials[b] = focal_strided_block(
                        logits, target, &fp, loss_out, write_loss, grad, write_grad,
                        grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
            else:
                for b in prange(nb, schedule="static", num_threads=nt):
                    partials[b] = focal_strided_block(
                        logits, target, &fp, loss_out, write_loss, grad, write_grad,
                        grad_scale, b * BLOCK_SIZE, min((b + 1) * BLOCK_SIZE, n),
                    )
        total = sum_partials(partials, nb)
    free(partials)
    return total
