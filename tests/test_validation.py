import numpy as np
import pytest

from fastloss import _validation as v


def _layouts(rng):
    base = rng.standard_normal((4, 5, 6))
    yield "c", base
    yield "f", np.asfortranarray(base)
    yield "strided", rng.standard_normal((8, 5, 12))[::2, :, ::2]
    yield "negative", base[::-1, :, ::-1]
    yield "transposed", rng.standard_normal((6, 5, 4)).transpose(2, 1, 0)
    yield "middle-axis", rng.standard_normal((4, 10, 6))[:, ::2, :]
    yield "broadcast", np.broadcast_to(rng.standard_normal((1, 5, 1)), (4, 5, 6))
    yield "size-1 axes", rng.standard_normal((4, 1, 5, 1, 6))[:, :, :, :, ::-1]


def _relayout(x, layout):
    """Return the logical array ``x`` stored in another memory layout."""
    if layout == "c":
        return np.ascontiguousarray(x)
    if layout == "f":
        return np.asfortranarray(x)
    if layout == "strided":
        big = np.empty(tuple(2 * n for n in x.shape))
        view = big[tuple(slice(None, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    if layout == "negative":
        flipped = np.ascontiguousarray(x[::-1, ..., ::-1])
        return flipped[::-1, ..., ::-1]
    raise AssertionError(layout)


@pytest.mark.parametrize("other_layout", ["c", "f", "strided", "negative"])
def test_as_2d_views_walks_arrays_in_step(rng, other_layout):
    for name, a in _layouts(rng):
        b = _relayout(2.0 * a, other_layout)
        va, vb = v.as_2d_views([a, b])
        assert va.ndim == 2, name
        assert va.shape == vb.shape, name
        assert va.size == a.size, name
        np.testing.assert_array_equal(vb, 2.0 * va, err_msg=name)
        np.testing.assert_array_equal(np.sort(va, axis=None), np.sort(a, axis=None))


def test_as_2d_views_no_copy_for_mergeable(rng):
    a = rng.standard_normal((8, 5, 12))[::2, :, ::2]
    (va,) = v.as_2d_views([a])
    assert np.shares_memory(va, a)
    f = np.asfortranarray(rng.standard_normal((3, 4, 5)))
    (vf,) = v.as_2d_views([f])
    assert np.shares_memory(vf, f)
    assert vf.shape == (1, 60)


def test_as_2d_views_zero_stride_huge():
    a = np.broadcast_to(np.float32(1.0), (2**31 + 3,))
    (va,) = v.as_2d_views([a])
    assert va.shape == (1, 2**31 + 3)
    assert va.strides == (0, 0) or va.strides[1] == 0


def test_class_axis_view_channels_last(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    view, base = v.class_axis_view(x, 3)
    assert view.shape == (24, 5, 1)
    assert np.shares_memory(view, x)
    np.testing.assert_array_equal(view[:, :, 0], x.reshape(24, 5))


def test_class_axis_view_copies_unmergeable(rng):
    x = rng.standard_normal((4, 3, 6, 8))[:, :, ::2, 1::2][:, :, :, :3]
    view, base = v.class_axis_view(x, 1)
    assert view.shape == (4, 3, 9)
    np.testing.assert_array_equal(view, np.ascontiguousarray(x).reshape(4, 3, 9))


def test_index_view_splits(rng):
    t = rng.integers(0, 5, size=(2, 3, 4))
    view = v.index_view(t, 1)
    assert view.shape == (2, 12)
    np.testing.assert_array_equal(view, t.reshape(2, 12))


@pytest.mark.parametrize(
    "value, match",
    [("avg", "reduction must be one of"), (None, "got None"), (1, "got 1")],
)
def test_check_reduction_rejects(value, match):
    with pytest.raises(ValueError, match=match):
        v.check_reduction(value)


def test_resolve_n_threads():
    assert v.resolve_n_threads(3) == 3
    assert v.resolve_n_threads(np.int64(2)) == 2
    assert v.resolve_n_threads(None) >= 1
    with pytest.raises(ValueError, match="n_threads must be None or an int >= 1, got 0"):
        v.resolve_n_threads(0)
    with pytest.raises(TypeError, match="n_threads must be None or an int"):
        v.resolve_n_threads(2.0)
    with pytest.raises(TypeError, match="n_threads must be None or an int"):
        v.resolve_n_threads(True)


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (np.float16, np.float32),
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.int8, np.float64),
        (np.uint64, np.float64),
        (np.bool_, np.float64),
        (">f4", np.float32),
    ],
)
def test_as_float_array_dtype_rules(dtype, expected):
    a = v.as_float_array(np.arange(3).astype(dtype), "pred")
    assert a.dtype == expected
    assert a.dtype.isnative


@pytest.mark.parametrize("bad", [np.array([1j]), np.array(["a"]), np.array([None])])
def test_as_float_array_rejects_non_real(bad):
    with pytest.raises(TypeError, match="pred must be an array of real numbers"):
        v.as_float_array(bad, "pred")


def test_as_index_array_uint64_out_of_range_stays_out_of_range():
    t = v.as_index_array(np.array([2**63 + 5, 1], dtype=np.uint64), "target")
    assert t[0] == np.iinfo(np.int64).max
    assert t[1] == 1


def test_check_grad_out_errors():
    shape, dtype = (3,), np.dtype(np.float32)
    with pytest.raises(TypeError, match="grad_out must be a numpy.ndarray"):
        v.check_grad_out([0.0, 0.0, 0.0], shape, dtype)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(3,\)"):
        v.check_grad_out(np.empty(4, np.float32), shape, dtype)
    with pytest.raises(ValueError, match="grad_out must have dtype float32"):
        v.check_grad_out(np.empty(3, np.float64), shape, dtype)
    ro = np.empty(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="grad_out must be writeable"):
        v.check_grad_out(ro, shape, dtype)


@pytest.mark.parametrize("other_layout", ["c", "f", "strided", "negative"])
def test_as_3d_views_walks_arrays_in_step(rng, other_layout):
    for name, a in _layouts(rng):
        b = _relayout(2.0 * a, other_layout)
        va, vb = v.as_3d_views([a, b])
        assert va.ndim == 3, name
        assert va.shape == vb.shape, name
        assert va.size == a.size, name
        np.testing.assert_array_equal(vb, 2.0 * va, err_msg=name)
        np.testing.assert_array_equal(np.sort(va, axis=None), np.sort(a, axis=None))


def test_as_3d_views_middle_broadcast_in_place(rng):
    x = rng.standard_normal((4, 3, 5, 6))
    w = np.broadcast_to(rng.standard_normal((1, 3, 1, 1)), x.shape)
    vx, vw = v.as_3d_views([x, w])
    assert np.shares_memory(vx, x)
    assert np.shares_memory(vw, w)
    assert vw.strides == (0, 8, 0)
    np.testing.assert_array_equal(
        np.broadcast_to(vw, vx.shape), np.broadcast_to(w, x.shape).reshape(vx.shape)
    )


def test_as_3d_views_small_shapes():
    for shape in [(), (0,), (7,), (2, 0, 3), (1, 1, 1)]:
        a = np.zeros(shape)
        (va,) = v.as_3d_views([a])
        assert va.ndim == 3, shape
        assert va.size == a.size, shape


def test_as_3d_views_copies_beyond_three_runs(rng):
    x = rng.standard_normal((3, 4, 5, 6))
    y = rng.standard_normal((6, 8, 10, 12))[::2, ::2, ::2, ::2]
    vx, vy = v.as_3d_views([x, y])
    assert np.shares_memory(vx, x)
    assert not np.shares_memory(vy, y)
    np.testing.assert_array_equal(vy.reshape(x.shape), y)


def test_as_float_array_overflow_to_inf_without_warning():
    # float64 values beyond float32's range become inf in a float32 compute
    # dtype, as the cast itself gives, but no RuntimeWarning escapes.
    a = v.as_float_array(np.array([1e300, -1e40, 1.0]), "target", np.dtype(np.float32))
    assert a.dtype == np.float32
    assert a[0] == np.inf
    assert a[1] == -np.inf
    assert a[2] == 1.0


@pytest.mark.parametrize("axis", [True, False, np.bool_(True)])
def test_normalize_axis_rejects_bool(axis):
    with pytest.raises(TypeError, match="axis must be an int, got bool"):
        v.normalize_axis(axis, 3)


def test_check_reduction_accepts_str_subclass():
    reduction = v.check_reduction(np.str_("sum"))
    assert reduction == "sum"
    assert type(reduction) is str


def test_to_scalar_float32_overflow_is_inf():
    value = v.to_scalar(1e39, np.dtype(np.float32))
    assert type(value) is np.float32
    assert value == np.inf
    assert v.to_scalar(-1e39, np.dtype(np.float32)) == -np.inf
    assert type(v.to_scalar(1e39, np.dtype(np.float64))) is np.float64
    assert np.isnan(v.to_scalar(float("nan"), np.dtype(np.float32)))


def test_grad_out_needs_buffer():
    a = np.arange(12.0).reshape(3, 4)
    other = np.zeros((3, 4))
    # The very same view is safe for a kernel that reads each element before
    # writing it, and any other overlap is not.
    assert not v.grad_out_needs_buffer(a, [a, other])
    assert not v.grad_out_needs_buffer(a, [a[...], other])
    assert not v.grad_out_needs_buffer(other, [a])
    assert not v.grad_out_needs_buffer(a.T.copy().T, [a])
    assert not v.grad_out_needs_buffer(None, [a])
    assert v.grad_out_needs_buffer(a[::-1], [a])
    assert v.grad_out_needs_buffer(a, [np.broadcast_to(a[0], (3, 4))])
    assert v.grad_out_needs_buffer(a.view(np.int64), [a])
