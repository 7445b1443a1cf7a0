"""Edge cases of the short call paths and of the float32 and threading kernels."""

import subprocess
import sys

import numpy as np
import pytest

import fastloss as fl

REGRESSION_LOSSES = [
    fl.mse_loss,
    fl.l1_loss,
    fl.smooth_l1_loss,
    fl.huber_loss,
    fl.log_cosh_loss,
    fl.pinball_loss,
]


@pytest.mark.parametrize("loss", REGRESSION_LOSSES)
def test_float32_grad_out_is_pred(loss):
    # A float32 chunk with a zero sum is computed again in double, after its
    # gradient was written, so a grad_out over pred must go through a buffer.
    target = np.arange(1, 257, dtype=np.float32)
    pred = target.copy()
    expected = loss(pred.copy(), target, reduction="sum")
    assert expected == 0.0
    got = loss(pred, target, reduction="sum", grad_out=pred)
    assert got == expected
    assert np.array_equal(pred, np.zeros(256, np.float32))


def test_float32_grad_out_is_target():
    target = np.arange(1, 257, dtype=np.float32)
    pred = target.copy()
    got = fl.mse_loss(pred, target, reduction="sum", grad_out=target)
    assert got == 0.0


def test_float32_rmse_grad_out_is_pred():
    # The zero-error half of the gradient must stay 0.
    target = np.ones(256, np.float32)
    pred = target.copy()
    pred[128:] = 2
    loss, expected = fl.rmse_loss(pred.copy(), target, return_grad=True)
    got_loss, got = fl.rmse_loss(pred, target, return_grad=True, grad_out=pred)
    assert got_loss == loss
    np.testing.assert_array_equal(got, expected)


def test_smooth_l1_beta_zero_layouts():
    # beta = 0 runs the l1 loops on both layouts, with the same float32
    # sums, so the two layouts give the same bits.
    target = np.random.default_rng(10).standard_normal(128).astype(np.float32)
    pred = np.zeros(128, np.float32)
    contiguous = fl.smooth_l1_loss(pred, target, beta=0.0, reduction="sum")
    strided_target = np.zeros(256, np.float32)
    strided_target[::2] = target
    strided = fl.smooth_l1_loss(
        np.zeros(256, np.float32)[::2], strided_target[::2], beta=0.0, reduction="sum"
    )
    assert contiguous.tobytes() == strided.tobytes()


@pytest.mark.parametrize("loss", [fl.mse_loss, fl.l1_loss, fl.rmse_loss])
def test_regression_misaligned_grad_out(loss):
    # A misaligned but writeable grad_out is filled through an aligned
    # buffer, as the classification losses do.
    n = 16
    grad_out = np.frombuffer(bytearray(8 * n + 1), dtype=np.float64, count=n, offset=1)
    assert grad_out.flags.writeable and not grad_out.flags.aligned
    pred = np.arange(n, dtype=np.float64)
    target = np.ones(n)
    _, expected = loss(pred, target, return_grad=True)
    loss(pred, target, grad_out=grad_out)
    np.testing.assert_array_equal(grad_out, expected)


HUGE_THREAD_CALLS = [
    "fl.binary_cross_entropy_with_logits(np.zeros(40000), np.ones(40000), n_threads=N)",
    "fl.sigmoid_focal_loss(np.zeros(40000), np.ones(40000), n_threads=N)",
    "fl.cross_entropy(np.zeros((20000, 2)), np.zeros(20000, np.int64), n_threads=N)",
    "fl.cross_entropy(np.zeros((20000, 2)), np.zeros((20000, 2)), n_threads=N)",
    "fl.focal_loss(np.zeros((20000, 2)), np.zeros(20000, np.int64), n_threads=N)",
    "fl.dice_loss(np.zeros((20000, 2)), np.zeros(20000, np.int64), n_threads=N)",
]


@pytest.mark.parametrize("call", HUGE_THREAD_CALLS)
def test_huge_n_threads_no_crash(call):
    # A count this large would exhaust the thread or memory limit if it
    # reached OpenMP; it is capped first, so each call runs in a subprocess
    # to keep a crash out of the test run.
    for n_threads in (100_000, 2**31 - 1):
        code = f"import numpy as np, fastloss as fl\nN = {n_threads}\nprint(float({call}))"
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (n_threads, result.returncode, result.stderr[-300:])


@pytest.mark.parametrize(
    "call",
    [
        lambda n: fl.mse_loss(np.zeros(10), np.zeros(10), n_threads=n),
        lambda n: fl.binary_cross_entropy_with_logits(np.zeros(10), np.zeros(10), n_threads=n),
        lambda n: fl.cross_entropy(np.zeros((5, 2)), np.zeros(5, np.int64), n_threads=n),
        lambda n: fl.dice_loss(np.zeros((5, 2)), np.zeros(5, np.int64), n_threads=n),
    ],
)
def test_n_threads_beyond_int_is_capped(call):
    # A count beyond C's int is lowered to the cap like any huge count, and
    # gives the bits of one thread.
    assert call(2**31).tobytes() == call(1).tobytes()


def test_resolve_n_threads_caps_huge_counts():
    from fastloss._validation import MAX_THREADS, resolve_n_threads

    assert resolve_n_threads(10**6) == MAX_THREADS
    assert resolve_n_threads(MAX_THREADS) == MAX_THREADS
    assert resolve_n_threads(3) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", REGRESSION_LOSSES)
def test_grad_out_shifted_over_pred(loss, dtype):
    # grad_out one element past pred in the same buffer: every gradient
    # element would land on the next element of pred before it is read.
    n = 300
    buffer = np.random.default_rng(3).standard_normal(n + 1).astype(dtype)
    target = np.random.default_rng(4).standard_normal(n).astype(dtype)
    pred = buffer[:n]
    expected_loss, expected = loss(pred.copy(), target, return_grad=True)
    got_loss = loss(pred, target, grad_out=buffer[1:])
    assert got_loss == expected_loss
    np.testing.assert_array_equal(buffer[1:], expected)
