# Statistics that fastloss.diagnose reads from one batch of logits and targets.
#
# Layers:
#   1. ``_softmax_tile`` walks one tile of at most TILE positions inside one
#      outer row of an ``(outer, C, inner)`` logits view, in three phases: a
#      pass over the classes for the running max, the range checks and the
#      NaN/inf counts; a pass for the exp sums (and the target sums of a
#      probability target); a pass over the positions for log-sum-exp, the
#      loss, the squared gradient norm and the histograms. ``_sigmoid_block``
#      walks one block of BLOCK_SIZE elements of a 2-D view in one pass.
#   2. ``softmax_stats`` and ``sigmoid_stats`` run the tiles or blocks in a
#      ``prange`` and combine the results.
#
# Determinism: float sums are kept per tile (per block for the sigmoid loss)
# in double and combined with ``sum_partials`` in a fixed order, so they do
# not depend on the thread count. Counts and histograms are integers summed
# per thread, and minima and maxima are exact, so their order does not matter
# either.
#
# The wrapper has already checked every shape: the index target is
# ``(outer, inner)``, the probability target has the logits' view shape,
# ``weight`` has length C, and class indices are int64. It also swaps an
# ``(outer, C, 1)`` view of ``(N, C)`` data to ``(1, C, outer)``, so that a
# tile spans many positions.

from cython.parallel cimport prange, threadid
from libc.math cimport log, fabs, INFINITY
from ._fastmath cimport fl_exp, fl_log1p
from libc.stdint cimport int64_t

from ._common cimport floating, BLOCK_SIZE, threads_for, sum_partials

import numpy as np

# Positions per softmax tile. The tile's scratch (N_SCRATCH doubles per
# position, 34 KiB) stays in L1 or L2, and the class loop reads TILE
# neighbouring positions of one class at a time, which is the contiguous
# direction of NCHW data.
cdef enum:
    TILE = 256

# Scratch rows per thread, each TILE doubles long.
cdef enum:
    S_MAX = 0
    S_EXP_SUM = 1
    S_EXP_SQ = 2
    S_LOGIT_SUM = 3
    S_IN_01 = 4
    S_NON_POSITIVE = 5
    S_BAD = 6
    S_ARGMAX = 7
    S_TARGET_SUM = 8
    S_TARGET_MAX = 9
    S_TARGET_ARGMAX = 10
    S_TARGET_BAD = 11
    S_WTARGET_SUM = 12
    S_WTARGET_LOGIT = 13
    S_WTARGET_EXP = 14
    S_WTARGET_SQ = 15
    S_MASKED = 16
    S_LOGIT_SQ = 17
    S_LOGIT_MIN = 18
    N_SCRATCH = 19

# Count slots, in the order of COUNT_FIELDS.
cdef enum:
    K_NAN = 0
    K_POSINF = 1
    K_NEGINF = 2
    K_FINITE = 3
    K_BAD_POSITIONS = 4
    K_PROB_LIKE = 5
    K_LOGPROB_LIKE = 6
    K_CONFIDENT_WRONG = 7
    K_IGNORED = 8
    K_INVALID = 9
    K_KEPT = 10
    K_MASKED_TARGET = 11
    K_TARGET_NONFINITE = 12
    K_TARGET_OUTSIDE_01 = 13
    K_ROWS_OVER = 14
    K_ROWS_UNDER = 15
    K_LOSS_POSITIONS = 16
    K_IN_01 = 17
    K_POSITIVE = 18
    K_PREDICTED_POSITIVE = 19
    N_COUNTS = 20

# Float sum slots, in the order of SUM_FIELDS.
cdef enum:
    F_LOSS = 0
    F_WEIGHT = 1
    F_GRAD_SQ = 2
    F_LOGIT_SUM = 3
    F_LOGIT_SQ = 4
    N_SUMS = 5

# Extrema slots, in the order of EXTREMA_FIELDS. Maxima are stored negated so
# that one minimum combines every slot.
cdef enum:
    E_LOGIT_MIN = 0
    E_LOGIT_MAX = 1
    E_TARGET_MIN = 2
    E_TARGET_MAX = 3
    E_ROW_MIN = 4
    E_ROW_MAX = 5
    N_EXTREMA = 6

COUNT_FIELDS = (
    "n_nan_logits", "n_posinf_logits", "n_neginf_logits", "n_finite_logits",
    "n_nonfinite_positions", "n_probability_like", "n_log_probability_like",
    "n_confident_wrong", "n_ignored", "n_invalid", "n_kept", "n_masked_target",
    "n_nonfinite_target", "n_target_outside_01", "n_rows_over_1",
    "n_rows_under_1", "n_loss_positions", "n_logits_in_01", "n_positive_target",
    "n_predicted_positive",
)
SUM_FIELDS = ("loss_sum", "weight_sum", "grad_sq_sum", "logit_sum", "logit_sq_sum")
EXTREMA_FIELDS = (
    "logit_min", "logit_max", "target_min", "target_max", "row_sum_min",
    "row_sum_max",
)

# A position counts as confidently predicted when its largest softmax
# probability exceeds 0.99, which is when the exp sum relative to the max is
# below 1 / 0.99.
cdef double CONFIDENT_EXP_SUM = 1.0 / 0.99


cdef inline bint is_finite(double v) noexcept nogil:
    return v - v == 0.0


cdef inline void _add_exps(const floating* x, Py_ssize_t n, const double* m,
                           double* s, double* s2) noexcept nogil:
    # Add exp(x[i] - m[i]) to s[i] and its square to s2[i] for i < n, with
    # fastmath.h's exp, which is within 1 ulp of libm's in double. Indexing
    # from moving pointers keeps the loop free of signed index arithmetic,
    # which Python's -fwrapv would make the vectorizer check.
    cdef const floating* stop = x + n
    cdef double e

    while x < stop:
        e = fl_exp(x[0] - m[0])
        s[0] += e
        s2[0] += e * e
        x += 1
        m += 1
        s += 1
        s2 += 1


cdef inline void _scan_logit(double v, double c, double* lane,
                             int64_t* n_finite, int64_t* n_nan, int64_t* n_posinf,
                             int64_t* n_neginf) noexcept nogil:
    # Phase 1 for the logit v of class c at one position, whose slot of
    # scratch row 0 is lane[0]. Every update is a select, so the loop over
    # the positions of a class vectorizes. A non-finite logit leaves the max,
    # the argmax, the min and the moments alone. A NaN or +inf logit marks
    # the position bad, and a -inf logit masks its class.
    cdef bint finite = v - v == 0.0
    cdef double v_max = v if finite else -INFINITY
    cdef double v_min = v if finite else INFINITY
    cdef double v_sum = v if finite else 0.0
    cdef bint up = v_max > lane[S_MAX * TILE]

    lane[S_ARGMAX * TILE] = c if up else lane[S_ARGMAX * TILE]
    lane[S_MAX * TILE] = v_max if up else lane[S_MAX * TILE]
    lane[S_LOGIT_MIN * TILE] = (
        v_min if v_min < lane[S_LOGIT_MIN * TILE] else lane[S_LOGIT_MIN * TILE]
    )
    lane[S_LOGIT_SUM * TILE] += v_sum
    lane[S_LOGIT_SQ * TILE] += v_sum * v_sum
    # NaN fails both comparisons, and +inf clears the flags only of a
    # position that is bad anyway, which phase 3 skips.
    lane[S_IN_01 * TILE] = 0.0 if (v < 0.0) | (v > 1.0) else lane[S_IN_01 * TILE]
    lane[S_NON_POSITIVE * TILE] = 0.0 if v > 0.0 else lane[S_NON_POSITIVE * TILE]
    lane[S_BAD * TILE] = lane[S_BAD * TILE] if v < INFINITY else 1.0
    n_finite[0] += finite
    n_nan[0] += v != v
    n_posinf[0] += v == INFINITY
    n_neginf[0] += v == -INFINITY


cdef void _scan_class(const floating* x, Py_ssize_t n, double c, double* lane,
                      int64_t* counts) noexcept nogil:
    # Phase 1 for n contiguous logits of class c, indexed from moving
    # pointers as in _add_exps. counts holds the finite, NaN, +inf and -inf
    # counts.
    cdef const floating* stop = x + n
    cdef int64_t n_finite = 0, n_nan = 0, n_posinf = 0, n_neginf = 0

    while x < stop:
        _scan_logit(x[0], c, lane, &n_finite, &n_nan, &n_posinf, &n_neginf)
        x += 1
        lane += 1
    counts[0] += n_finite
    counts[1] += n_nan
    counts[2] += n_posinf
    counts[3] += n_neginf


cdef void _softmax_tile(
    const floating[:, :, :] logits,
    int mode,
    const int64_t[:, :] target_index,
    const floating[:, :, :] target_prob,
    const double[::1] weight,
    int64_t ignore_index,
    double tol,
    Py_ssize_t o,
    Py_ssize_t i0,
    Py_ssize_t n,
    double* scratch,
    int64_t* counts,
    int64_t* hist_pred,
    int64_t* hist_target,
    double* sums,
    double* extrema,
) noexcept nogil:
    """Accumulate the statistics of positions ``i0 .. i0 + n`` of row ``o``.

    ``mode`` is 0 without a target, 1 for class indices and 2 for class
    probabilities. ``counts`` and the histograms belong to the calling thread;
    ``sums`` and ``extrema`` are this tile's own N_SUMS and N_EXTREMA slots.
    """
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef double* m = scratch + S_MAX * TILE
    cdef double* s = scratch + S_EXP_SUM * TILE
    cdef double* s2 = scratch + S_EXP_SQ * TILE
    cdef double* xs = scratch + S_LOGIT_SUM * TILE
    cdef double* in01 = scratch + S_IN_01 * TILE
    cdef double* nonpos = scratch + S_NON_POSITIVE * TILE
    cdef double* bad = scratch + S_BAD * TILE
    cdef double* arg = scratch + S_ARGMAX * TILE
    cdef double* ysum = scratch + S_TARGET_SUM * TILE
    cdef double* ymax = scratch + S_TARGET_MAX * TILE
    cdef double* yarg = scratch + S_TARGET_ARGMAX * TILE
    cdef double* ybad = scratch + S_TARGET_BAD * TILE
    cdef double* wys = scratch + S_WTARGET_SUM * TILE
    cdef double* wyx = scratch + S_WTARGET_LOGIT * TILE
    cdef double* wye = scratch + S_WTARGET_EXP * TILE
    cdef double* wyy = scratch + S_WTARGET_SQ * TILE
    cdef double* masked = scratch + S_MASKED * TILE
    cdef double* xsq_lanes = scratch + S_LOGIT_SQ * TILE
    cdef double* xmin_lanes = scratch + S_LOGIT_MIN * TILE
    cdef int64_t logit_counts[4]
    cdef Py_ssize_t c, i, ti, pred
    cdef double v, y, wy, e, lse, wt, vt, pt, g2, sp2
    cdef double xmin = INFINITY, xmax = -INFINITY, xsum = 0.0, xsq = 0.0
    cdef double ymin = INFINITY, ymaxall = -INFINITY
    cdef double rmin = INFINITY, rmax = -INFINITY
    cdef double loss = 0.0, wsum = 0.0, grad_sq = 0.0
    cdef int64_t n_nan = 0, n_posinf = 0, n_neginf = 0, n_finite = 0
    cdef int64_t n_t_nonfinite = 0, n_t_out = 0
    cdef bint unit_stride = logits.strides[2] == sizeof(floating)

    for i in range(n):
        m[i] = -INFINITY
        s[i] = 0.0
        s2[i] = 0.0
        xs[i] = 0.0
        in01[i] = 1.0
        nonpos[i] = 1.0
        bad[i] = 0.0
        arg[i] = 0.0
        ysum[i] = 0.0
        ymax[i] = -INFINITY
        yarg[i] = 0.0
        ybad[i] = 0.0
        wys[i] = 0.0
        wyx[i] = 0.0
        wye[i] = 0.0
        wyy[i] = 0.0
        masked[i] = 0.0
        xsq_lanes[i] = 0.0
        xmin_lanes[i] = INFINITY

    # Phase 1: running max and argmax, range checks, NaN/inf counts, and
    # per-position sums, squares and minima of the finite logits, which are
    # combined over the positions below in a fixed order.
    logit_counts[0] = 0
    logit_counts[1] = 0
    logit_counts[2] = 0
    logit_counts[3] = 0
    for c in range(n_classes):
        if unit_stride:
            _scan_class(&logits[o, c, i0], n, c, scratch, logit_counts)
        else:
            for i in range(n):
                _scan_logit(logits[o, c, i0 + i], c, scratch + i, &logit_counts[0],
                            &logit_counts[1], &logit_counts[2], &logit_counts[3])
    n_finite = logit_counts[0]
    n_nan = logit_counts[1]
    n_posinf = logit_counts[2]
    n_neginf = logit_counts[3]
    xsum = sum_partials(xs, n)
    xsq = sum_partials(xsq_lanes, n)
    for i in range(n):
        xmin = xmin_lanes[i] if xmin_lanes[i] < xmin else xmin
        xmax = m[i] if m[i] > xmax else xmax

    for i in range(n):
        if m[i] == -INFINITY:
            bad[i] = 1.0

    # Phase 2: exp sums relative to the max, and for a probability target the
    # weighted target sums that the loss and gradient norm need.
    if mode == 2:
        for c in range(n_classes):
            for i in range(n):
                v = logits[o, c, i0 + i]
                y = target_prob[o, c, i0 + i]
                if not is_finite(y):
                    n_t_nonfinite += 1
                    ybad[i] = 1.0
                else:
                    if y < 0.0 or y > 1.0:
                        n_t_out += 1
                    if y < ymin:
                        ymin = y
                    if y > ymaxall:
                        ymaxall = y
                    ysum[i] += y
                    if y > ymax[i]:
                        ymax[i] = y
                        yarg[i] = c
                    wy = weight[c] * y
                    wys[i] += wy
                    wyy[i] += wy * wy
                    if v == -INFINITY:
                        # 0 * -inf would be NaN; a masked class with no target
                        # mass costs nothing, one with target mass costs inf.
                        if wy != 0.0:
                            masked[i] = 1.0
                    elif bad[i] == 0.0:
                        wyx[i] += wy * v
                        wye[i] += wy * fl_exp(v - m[i])
                if bad[i] == 0.0:
                    e = fl_exp(v - m[i])
                    s[i] += e
                    s2[i] += e * e
    elif unit_stride:
        # No branch: at a bad position the sums turn NaN or inf, and phase 3
        # skips that position. The positions of one class are contiguous
        # here, so the loop runs from a pointer and vectorizes.
        for c in range(n_classes):
            _add_exps(&logits[o, c, i0], n, m, s, s2)
    else:
        for c in range(n_classes):
            for i in range(n):
                e = fl_exp(logits[o, c, i0 + i] - m[i])
                s[i] += e
                s2[i] += e * e

    # Phase 3: one position at a time.
    for i in range(n):
        ti = -1
        if mode == 1:
            ti = target_index[o, i0 + i]
            if ti == ignore_index:
                counts[K_IGNORED] += 1
                ti = -1
            elif ti < 0 or ti >= n_classes:
                counts[K_INVALID] += 1
                ti = -1
            else:
                counts[K_KEPT] += 1
                hist_target[ti] += 1
        elif mode == 2 and ybad[i] == 0.0:
            counts[K_KEPT] += 1
            hist_target[<Py_ssize_t>yarg[i]] += 1
            if ysum[i] < rmin:
                rmin = ysum[i]
            if ysum[i] > rmax:
                rmax = ysum[i]
            if ysum[i] > 1.0 + tol:
                counts[K_ROWS_OVER] += 1
            elif ysum[i] < 1.0 - tol:
                counts[K_ROWS_UNDER] += 1

        if bad[i] != 0.0:
            counts[K_BAD_POSITIONS] += 1
            continue
        lse = m[i] + log(s[i])
        pred = <Py_ssize_t>arg[i]
        hist_pred[pred] += 1
        if in01[i] != 0.0 and fabs(xs[i] - 1.0) <= tol:
            counts[K_PROB_LIKE] += 1
        if nonpos[i] != 0.0 and fabs(lse) <= tol:
            counts[K_LOGPROB_LIKE] += 1
        sp2 = s2[i] / (s[i] * s[i])

        if ti >= 0:
            vt = logits[o, ti, i0 + i]
            if vt == -INFINITY:
                counts[K_MASKED_TARGET] += 1
                continue
            wt = weight[ti]
            loss += wt * (lse - vt)
            wsum += wt
            pt = fl_exp(vt - m[i]) / s[i]
            # |p - onehot|^2 = sum p^2 - 2 p_t + 1, clamped at 0 against
            # rounding when p is one-hot.
            g2 = sp2 - 2.0 * pt + 1.0
            if g2 < 0.0:
                g2 = 0.0
            grad_sq += wt * wt * g2
            counts[K_LOSS_POSITIONS] += 1
            if pred != ti and s[i] < CONFIDENT_EXP_SUM:
                counts[K_CONFIDENT_WRONG] += 1
        elif mode == 2 and ybad[i] == 0.0:
            if masked[i] != 0.0:
                counts[K_MASKED_TARGET] += 1
                continue
            # loss = sum_c w_c y_c (lse - x_c); grad_c = p_c sum(wy) - w_c y_c.
            loss += lse * wys[i] - wyx[i]
            wsum += 1.0
            g2 = wys[i] * wys[i] * sp2 - 2.0 * wys[i] * wye[i] / s[i] + wyy[i]
            if g2 < 0.0:
                g2 = 0.0
            grad_sq += g2
            counts[K_LOSS_POSITIONS] += 1
            if pred != <Py_ssize_t>yarg[i] and s[i] < CONFIDENT_EXP_SUM:
                counts[K_CONFIDENT_WRONG] += 1

    counts[K_NAN] += n_nan
    counts[K_POSINF] += n_posinf
    counts[K_NEGINF] += n_neginf
    counts[K_FINITE] += n_finite
    counts[K_TARGET_NONFINITE] += n_t_nonfinite
    counts[K_TARGET_OUTSIDE_01] += n_t_out
    sums[F_LOSS] = loss
    sums[F_WEIGHT] = wsum
    sums[F_GRAD_SQ] = grad_sq
    sums[F_LOGIT_SUM] = xsum
    sums[F_LOGIT_SQ] = xsq
    extrema[E_LOGIT_MIN] = xmin
    extrema[E_LOGIT_MAX] = -xmax
    extrema[E_TARGET_MIN] = ymin
    extrema[E_TARGET_MAX] = -ymaxall
    extrema[E_ROW_MIN] = rmin
    extrema[E_ROW_MAX] = -rmax


def softmax_stats(
    const floating[:, :, :] logits,
    int mode,
    const int64_t[:, :] target_index,
    const floating[:, :, :] target_prob,
    const double[::1] weight,
    int64_t ignore_index,
    double tol,
    int n_threads,
):
    """Return the softmax statistics of an ``(outer, C, inner)`` logits view.

    ``mode`` is 0 without a target, 1 with the class-index target
    ``target_index`` of shape ``(outer, inner)``, and 2 with the probability
    target ``target_prob`` of the logits' view shape; the unused target may be
    any array of the right dtype. ``tol`` is the tolerance of the sum-to-one
    and log-sum-exp-is-zero checks.

    Returns ``(counts, sums, extrema, hist_pred, hist_target)``: int64 counts
    named by COUNT_FIELDS, float64 sums named by SUM_FIELDS, float64 extrema
    named by EXTREMA_FIELDS (inf or -inf where nothing was seen), and int64
    histograms of the predicted class and of the target class (the class of
    the largest probability for a probability target).
    """
    cdef Py_ssize_t outer = logits.shape[0]
    cdef Py_ssize_t n_classes = logits.shape[1]
    cdef Py_ssize_t inner = logits.shape[2]
    cdef Py_ssize_t tiles_per_row = (inner + TILE - 1) // TILE
    cdef Py_ssize_t n_tiles = outer * tiles_per_row
    cdef int nt = threads_for(outer * inner * n_classes, n_threads)
    cdef Py_ssize_t b, o, i0, n, k
    cdef int tid

    counts_np = np.zeros((nt, N_COUNTS), dtype=np.int64)
    hist_pred_np = np.zeros((nt, n_classes), dtype=np.int64)
    hist_target_np = np.zeros((nt, n_classes), dtype=np.int64)
    cdef int64_t[:, ::1] counts = counts_np
    cdef int64_t[:, ::1] hist_pred = hist_pred_np
    cdef int64_t[:, ::1] hist_target = hist_target_np
    cdef double[:, ::1] scratch = np.zeros((nt, N_SCRATCH * TILE))
    cdef double[:, ::1] per_tile_sums = np.zeros((max(n_tiles, 1), N_SUMS))
    cdef double[:, ::1] per_tile_extrema = np.full((max(n_tiles, 1), N_EXTREMA), np.inf)
    # The per-tile sums again, one contiguous row per slot for sum_partials.
    cdef double[:, ::1] sums = np.zeros((N_SUMS, max(n_tiles, 1)))
    cdef double[::1] totals = np.zeros(N_SUMS)

    if n_classes > 0 and n_tiles > 0:
        with nogil:
            for b in prange(n_tiles, schedule="static", num_threads=nt):
                tid = threadid()
                o = b // tiles_per_row
                i0 = (b % tiles_per_row) * TILE
                n = inner - i0
                if n > TILE:
                    n = TILE
                _softmax_tile(
                    logits, mode, target_index, target_prob, weight,
                    ignore_index, tol, o, i0, n,
                    &scratch[tid, 0], &counts[tid, 0], &hist_pred[tid, 0],
                    &hist_target[tid, 0], &per_tile_sums[b, 0],
                    &per_tile_extrema[b, 0],
                )
            for k in range(N_SUMS):
                for b in range(n_tiles):
                    sums[k, b] = per_tile_sums[b, k]
                totals[k] = sum_partials(&sums[k, 0], n_tiles)
    extrema = np.asarray(per_tile_extrema).min(axis=0)
    return _finish(counts_np, np.asarray(totals), extrema, hist_pred_np, hist_target_np)


def _finish(counts, sums, extrema, hist_pred, hist_target):
    """Sum the per-thread counts and undo the negation of the maxima."""
    extrema = np.array(extrema, dtype=np.float64)
    extrema[1::2] = -extrema[1::2]
    return (
        counts.sum(axis=0),
        np.array(sums, dtype=np.float64),
        extrema,
        hist_pred.sum(axis=0),
        hist_target.sum(axis=0),
    )


cdef void _sigmoid_block(
    const floating[:, :] logits,
    const floating[:, :] target,
    Py_ssize_t r,
    Py_ssize_t j0,
    Py_ssize_t j1,
    int64_t* counts,
    double* sums,
    double* extrema,
) noexcept nogil:
    """Accumulate the statistics of elements ``j0 .. j1`` of row ``r``."""
    cdef Py_ssize_t j
    cdef double v, y, a, p, g
    cdef double xmin = INFINITY, xmax = -INFINITY, xsum = 0.0, xsq = 0.0
    cdef double ymin = INFINITY, ymax = -INFINITY
    cdef double loss = 0.0, grad_sq = 0.0
    cdef int64_t n_nan = 0, n_posinf = 0, n_neginf = 0, n_finite = 0
    cdef int64_t n_t_bad = 0, n_t_out = 0, n_in01 = 0, n_pos = 0, n_pred_pos = 0
    cdef int64_t n_loss = 0

    for j in range(j0, j1):
        v = logits[r, j]
        y = target[r, j]
        if is_finite(y):
            if y < ymin:
                ymin = y
            if y > ymax:
                ymax = y
            if y < 0.0 or y > 1.0:
                n_t_out += 1
            if y > 0.5:
                n_pos += 1
        else:
            n_t_bad += 1
        if not is_finite(v):
            if v != v:
                n_nan += 1
            elif v > 0.0:
                n_posinf += 1
            else:
                n_neginf += 1
            continue
        n_finite += 1
        if v < xmin:
            xmin = v
        if v > xmax:
            xmax = v
        xsum += v
        xsq += v * v
        # The open interval: sigmoid output never reaches 0 or 1 before it
        # saturates, while zero-initialised logits are exactly 0.
        if v > 0.0 and v < 1.0:
            n_in01 += 1
        if v > 0.0:
            n_pred_pos += 1
        if not is_finite(y):
            continue
        # Stable softplus form: max(x, 0) - x*y + log1p(exp(-|x|)).
        a = fabs(v)
        loss += (v if v > 0.0 else 0.0) - v * y + fl_log1p(fl_exp(-a))
        if v >= 0.0:
            p = 1.0 / (1.0 + fl_exp(-v))
        else:
            p = fl_exp(v)
            p = p / (1.0 + p)
        g = p - y
        grad_sq += g * g
        n_loss += 1

    counts[K_NAN] += n_nan
    counts[K_POSINF] += n_posinf
    counts[K_NEGINF] += n_neginf
    counts[K_FINITE] += n_finite
    counts[K_TARGET_NONFINITE] += n_t_bad
    counts[K_TARGET_OUTSIDE_01] += n_t_out
    counts[K_IN_01] += n_in01
    counts[K_POSITIVE] += n_pos
    counts[K_PREDICTED_POSITIVE] += n_pred_pos
    counts[K_LOSS_POSITIONS] += n_loss
    sums[F_LOSS] = loss
    sums[F_WEIGHT] = <double>n_loss
    sums[F_GRAD_SQ] = grad_sq
    sums[F_LOGIT_SUM] = xsum
    sums[F_LOGIT_SQ] = xsq
    extrema[E_LOGIT_MIN] = xmin
    extrema[E_LOGIT_MAX] = -xmax
    extrema[E_TARGET_MIN] = ymin
    extrema[E_TARGET_MAX] = -ymax
    extrema[E_ROW_MIN] = INFINITY
    extrema[E_ROW_MAX] = INFINITY


def sigmoid_stats(
    const floating[:, :] logits,
    const floating[:, :] target,
    int n_threads,
):
    """Return the sigmoid statistics of same-shaped ``(rows, cols)`` views.

    Returns ``(counts, sums, extrema, hist_pred, hist_target)`` as
    ``softmax_stats`` does; the histograms count negatives and positives
    (target above 0.5, logit above 0).
    """
    cdef Py_ssize_t rows = logits.shape[0]
    cdef Py_ssize_t cols = logits.shape[1]
    cdef Py_ssize_t blocks_per_row = (cols + BLOCK_SIZE - 1) // BLOCK_SIZE
    cdef Py_ssize_t nb = rows * blocks_per_row
    cdef int nt = threads_for(rows * cols, n_threads)
    cdef Py_ssize_t b, r, j0, j1, k
    cdef int tid

    counts_np = np.zeros((nt, N_COUNTS), dtype=np.int64)
    cdef int64_t[:, ::1] counts = counts_np
    cdef double[:, ::1] per_block_sums = np.zeros((max(nb, 1), N_SUMS))
    cdef double[:, ::1] per_block_extrema = np.full((max(nb, 1), N_EXTREMA), np.inf)
    cdef double[:, ::1] sums = np.zeros((N_SUMS, max(nb, 1)))
    cdef double[::1] totals = np.zeros(N_SUMS)

    if nb > 0:
        with nogil:
            for b in prange(nb, schedule="static", num_threads=nt):
                tid = threadid()
                r = b // blocks_per_row
                j0 = (b % blocks_per_row) * BLOCK_SIZE
                j1 = j0 + BLOCK_SIZE
                if j1 > cols:
                    j1 = cols
                _sigmoid_block(
                    logits, target, r, j0, j1, &counts[tid, 0],
                    &per_block_sums[b, 0], &per_block_extrema[b, 0],
                )
            for k in range(N_SUMS):
                for b in range(nb):
                    sums[k, b] = per_block_sums[b, k]
                totals[k] = sum_partials(&sums[k, 0], nb)
    extrema_np = np.asarray(per_block_extrema).min(axis=0)

    total_counts = counts_np.sum(axis=0)
    n_target = rows * cols - total_counts[K_TARGET_NONFINITE]
    n_pred = total_counts[K_FINITE]
    hist_target = np.array(
        [n_target - total_counts[K_POSITIVE], total_counts[K_POSITIVE]], dtype=np.int64
    )
    hist_pred = np.array(
        [n_pred - total_counts[K_PREDICTED_POSITIVE], total_counts[K_PREDICTED_POSITIVE]],
        dtype=np.int64,
    )
    return _finish(counts_np, np.asarray(totals), extrema_np,
                   hist_pred[None, :], hist_target[None, :])
