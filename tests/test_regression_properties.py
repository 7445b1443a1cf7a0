"""Property tests of the regression losses on arbitrary finite inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastloss as fl
from test_regression import CASES, CASE_IDS, reference

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)


@st.composite
def pred_target_weight(draw):
    shape = draw(shapes)
    pred = draw(hnp.arrays(np.float64, shape, elements=finite))
    target = draw(hnp.arrays(np.float64, shape, elements=finite))
    weights = st.sampled_from([0.0, 0.5, 2.0])
    weight = draw(hnp.arrays(np.float64, shape, elements=weights))
    return pred, target, weight


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=25, deadline=None)
@given(data=pred_target_weight(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_matches_reference_on_any_input(case, data, reduction):
    pred, target, weight = data
    loss, grad = case(pred, target, weight=weight, reduction=reduction,
                      return_grad=True)
    expected_loss, expected_grad = reference(case, pred, target, weight, reduction)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=25, deadline=None)
@given(data=pred_target_weight())
def test_none_sums_to_sum(case, data):
    pred, target, weight = data
    per_element = case(pred, target, weight=weight, reduction="none")
    total = case(pred, target, weight=weight, reduction="sum")
    assert np.all(per_element >= 0)
    np.testing.assert_allclose(per_element.sum(), total, rtol=1e-12, atol=1e-300)


@settings(max_examples=25, deadline=None)
@given(data=pred_target_weight())
def test_rmse_squares_to_mse(data):
    pred, target, weight = data
    rmse = fl.rmse_loss(pred, target, weight=weight)
    mse = fl.mse_loss(pred, target, weight=weight)
    np.testing.assert_allclose(rmse * rmse, mse, rtol=1e-12, equal_nan=True)
