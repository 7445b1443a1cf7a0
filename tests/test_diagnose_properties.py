"""Property tests of fastloss.diagnose on arbitrary logits and targets."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastloss as fl

values = st.one_of(
    st.floats(-50, 50, width=32),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0]),
)
shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)
losses = st.sampled_from([
    "cross_entropy", "focal_loss", "dice_loss", "binary_cross_entropy_with_logits",
])


@st.composite
def logits_and_target(draw):
    shape = draw(shapes)
    logits = draw(hnp.arrays(np.float32, shape, elements=values))
    kind = draw(st.sampled_from(["index", "same", "other"]))
    if kind == "index" and len(shape) > 1:
        target_shape = shape[:1] + shape[2:]
    elif kind == "same":
        target_shape = shape
    else:
        target_shape = draw(shapes)
    dtype = draw(st.sampled_from([np.int64, np.uint8, np.float32, np.bool_]))
    if dtype == np.float32:
        elements = values
    elif dtype == np.bool_:
        elements = st.booleans()
    else:
        elements = st.integers(0 if dtype == np.uint8 else -101, 255)
    target = draw(hnp.arrays(dtype, target_shape, elements=elements))
    return logits, target


@settings(max_examples=150, deadline=None)
@given(data=logits_and_target(), loss=losses)
def test_any_input_gives_a_json_report(data, loss):
    # A mistake in the target is a finding, never an exception.
    logits, target = data
    d = fl.diagnose(logits, target, loss=loss)
    payload = json.loads(d.to_json())
    assert payload["ok"] == d.ok
    assert isinstance(str(d), str)
    for f in d.findings:
        assert f.severity in ("error", "warning", "info")
        assert f.message
        assert f.fix


@settings(max_examples=40, deadline=None)
@given(
    logits=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1,
                                                   max_side=6),
                      elements=st.floats(-30, 30)),
    data=st.data(),
)
def test_loss_matches_cross_entropy(logits, data):
    n_classes = logits.shape[1]
    index_shape = logits.shape[:1] + logits.shape[2:]
    target = data.draw(hnp.arrays(np.int64, index_shape,
                                  elements=st.integers(0, n_classes - 1)))
    d = fl.diagnose(logits, target)
    loss, grad = fl.cross_entropy(logits, target, return_grad=True)
    assert d.stats["loss"] == pytest.approx(float(loss), rel=1e-9, abs=1e-12)
    # The kernel forms each position's |p - onehot|^2 as sum(p^2) - 2 p_t + 1,
    # which cancels when p is nearly one-hot: its absolute error is a few ulp
    # of 1 per position, so compare squared norms with that bound.
    n_positions = target.size
    bound = 8 * np.finfo(np.float64).eps * n_positions / n_positions**2
    assert abs(d.stats["grad_norm"] ** 2 - np.linalg.norm(grad) ** 2) <= bound
