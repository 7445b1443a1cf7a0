import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastloss as fl
from fastloss import cli

# Regression losses, each with a non-default keyword where it takes one, so
# that --param reaches the loss.
REGRESSION_CASES = [
    ("mse_loss", {}),
    ("l1_loss", {}),
    ("smooth_l1_loss", {"beta": 0.5}),
    ("huber_loss", {"delta": 0.7}),
    ("log_cosh_loss", {}),
    ("pinball_loss", {"quantile": 0.3}),
]

RTOL = {np.float32: 2e-5, np.float64: 1e-12}


def _eval(capsys, *args):
    """Run ``fastloss eval`` in process and return (status, stdout, stderr)."""
    status = cli.main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def _eval_json(capsys, *args):
    status, out, err = _eval(capsys, *args, "--json")
    assert status == 0, err
    return json.loads(out)


def _assert_usage_error(status, out, err, match):
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastloss: error: ")
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def _params_args(params):
    args = []
    for name, value in params.items():
        args += ["--param", f"{name}={value}"]
    return args


@pytest.fixture
def arrays(tmp_path, rng):
    """Return a function that saves random pred, target and positive weights."""

    def save(dtype=np.float64, shape=(37, 5)):
        pred = rng.standard_normal(shape).astype(dtype)
        target = rng.standard_normal(shape).astype(dtype)
        weight = rng.uniform(0.0, 2.0, shape).astype(dtype)
        paths = {}
        for name, a in (("pred", pred), ("target", target), ("weight", weight)):
            paths[name] = tmp_path / f"{name}.npy"
            np.save(paths[name], a)
        return pred, target, weight, paths

    return save


# --- loss lookup and --param parsing -----------------------------------------


def test_available_losses_lists_regression():
    known = cli.available_losses()

    for name, _ in REGRESSION_CASES:
        assert name in known
    assert "rmse_loss" in known
    assert "openmp_enabled" not in known


def test_unknown_loss_lists_known(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_los", paths["pred"], paths["target"])

    _assert_usage_error(status, out, err, "unknown loss 'mse_los'")
    assert "did you mean 'mse_loss'?" in err
    assert "known losses: " in err
    assert "huber_loss" in err


def test_non_loss_attribute_is_unknown(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "openmp_enabled", paths["pred"], paths["target"])

    _assert_usage_error(status, out, err, "unknown loss 'openmp_enabled'")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a=1", 1),
        ("a=-3", -3),
        ("a=+4", 4),
        ("a=0.5", 0.5),
        ("a=1e-3", 1e-3),
        ("a=-inf", -np.inf),
        ("a=true", True),
        ("a=False", False),
        ("a=none", None),
        ("a=None", None),
        ("a=null", None),
        ("a=1,2,3", [1, 2, 3]),
        ("a=0.5, 1.5", [0.5, 1.5]),
        ("a=3,", [3]),
        ("a=multiclass", "multiclass"),
        ("a=@weights.npy", "@weights.npy"),
        (" a = 2 ", 2),
    ],
)
def test_parse_params_values(text, expected):
    params = cli.parse_params([text])

    assert list(params) == ["a"]
    value = params["a"]
    assert value == expected
    assert type(value) is type(expected)


def test_parse_params_nan():
    value = cli.parse_params(["a=nan"])["a"]

    assert isinstance(value, float)
    assert np.isnan(value)


def test_parse_params_several():
    assert cli.parse_params(["a=1", "b=x"]) == {"a": 1, "b": "x"}


@pytest.mark.parametrize(
    "text, match",
    [
        ("delta", "expects NAME=VALUE, got 'delta'"),
        ("=1", "must be a Python identifier, got ''"),
        ("1x=1", "must be a Python identifier, got '1x'"),
        ("delta=", "has an empty value"),
        ("w=1,,2", "has an empty list element"),
    ],
)
def test_parse_params_errors(text, match):
    with pytest.raises(cli.CommandError, match=match):
        cli.parse_params([text])


def test_parse_params_repeated_name():
    with pytest.raises(cli.CommandError, match="--param a is given more than once"):
        cli.parse_params(["a=1", "a=2"])


@pytest.mark.parametrize(
    "param, match",
    [
        ("delta", "--param expects NAME=VALUE"),
        ("delta=", "has an empty value"),
        ("beta=2", "huber_loss has no keyword 'beta'; it accepts: "),
        ("reduction=sum", "set reduction with --reduction"),
        ("grad_out=x", "set grad_out with --grad-out"),
        ("return_grad=true", "set return_grad with --grad-out"),
    ],
)
def test_eval_bad_param(capsys, arrays, param, match):
    _, _, _, paths = arrays()

    status, out, err = _eval(
        capsys, "huber_loss", paths["pred"], paths["target"], "--param", param
    )

    _assert_usage_error(status, out, err, match)


def test_eval_param_value_rejected_by_loss(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(
        capsys, "huber_loss", paths["pred"], paths["target"], "--param", "delta=-1"
    )

    _assert_usage_error(status, out, err, "huber_loss: ")
    assert "delta" in err


def test_eval_param_of_wrong_type(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(
        capsys, "huber_loss", paths["pred"], paths["target"], "--param", "delta=big"
    )

    _assert_usage_error(status, out, err, "huber_loss: ")
    assert "delta" in err


def test_eval_weight_given_twice(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(
        capsys, "mse_loss", paths["pred"], paths["target"],
        "--weight", paths["weight"], "--param", "weight=@" + str(paths["weight"]),
    )

    _assert_usage_error(status, out, err, "weight is given both by --weight")


def test_eval_param_array_from_file(capsys, arrays):
    pred, target, weight, paths = arrays()

    report = _eval_json(
        capsys, "mse_loss", paths["pred"], paths["target"],
        "--param", f"weight=@{paths['weight']}",
    )

    expected = fl.mse_loss(pred, target, weight=weight)
    assert report["loss"] == float(expected)
    assert report["params"] == {"weight": f"@{paths['weight']}"}


def test_eval_param_file_missing(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(
        capsys, "mse_loss", paths["pred"], paths["target"],
        "--param", f"weight=@{tmp_path / 'nowhere.npy'}",
    )

    _assert_usage_error(status, out, err, "--param weight: file not found")


# --- eval: results -----------------------------------------------------------


def test_eval_prints_library_value(capsys, arrays):
    pred, target, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"])

    assert status == 0
    assert err == ""
    assert out == f"{fl.mse_loss(pred, target)}\n"


def test_eval_json_fields(capsys, arrays):
    pred, target, _, paths = arrays(np.float32)

    report = _eval_json(
        capsys, "huber_loss", paths["pred"], paths["target"], "--param", "delta=0.5",
        "--reduction", "sum",
    )

    assert report["loss"] == float(fl.huber_loss(pred, target, delta=0.5,
                                                 reduction="sum"))
    assert report["loss_name"] == "huber_loss"
    assert report["reduction"] == "sum"
    assert report["n"] == pred.size
    assert report["dtype"] == "float32"
    assert report["shape"] == [37, 5]
    assert report["chunks"] == 1
    assert report["params"] == {"delta": 0.5}


@pytest.mark.parametrize("name, params", REGRESSION_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_chunked_matches_in_memory(capsys, arrays, name, params, reduction,
                                        weighted, dtype):
    pred, target, weight, paths = arrays(dtype)
    extra = ["--weight", paths["weight"]] if weighted else []

    report = _eval_json(
        capsys, name, paths["pred"], paths["target"], "--reduction", reduction,
        "--chunk-size", 20, *extra, *_params_args(params),
    )

    expected = getattr(fl, name)(pred, target, weight=weight if weighted else None,
                                 reduction=reduction, **params)
    assert report["chunks"] == 10
    assert report["n"] == pred.size
    assert report["dtype"] == np.dtype(dtype).name
    np.testing.assert_allclose(report["loss"], float(expected), rtol=RTOL[dtype])
    if weighted and reduction == "mean":
        np.testing.assert_allclose(report["weight_sum"], weight.sum(dtype=np.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_eval_chunked_rmse(capsys, arrays, reduction, weighted):
    pred, target, weight, paths = arrays()
    extra = ["--weight", paths["weight"]] if weighted else []

    report = _eval_json(
        capsys, "rmse_loss", paths["pred"], paths["target"], "--reduction",
        reduction, "--chunk-size", 7, *extra,
    )

    expected = fl.rmse_loss(pred, target, weight=weight if weighted else None,
                            reduction=reduction)
    assert report["chunks"] == 37
    np.testing.assert_allclose(report["loss"], float(expected), rtol=1e-12)


def test_eval_rmse_rejects_none(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "rmse_loss", paths["pred"], paths["target"],
                             "--reduction", "none", "--chunk-size", 7)

    _assert_usage_error(status, out, err, "rmse_loss: ")
    assert "reduction" in err


def test_eval_chunk_size_from_environment(capsys, arrays, monkeypatch):
    pred, target, _, paths = arrays()
    monkeypatch.setenv("FASTLOSS_CHUNK_SIZE", "50")

    report = _eval_json(capsys, "l1_loss", paths["pred"], paths["target"])

    assert report["chunks"] == 4
    np.testing.assert_allclose(report["loss"], float(fl.l1_loss(pred, target)),
                               rtol=1e-12)


def test_eval_bad_chunk_size_environment(capsys, arrays, monkeypatch):
    _, _, _, paths = arrays()
    monkeypatch.setenv("FASTLOSS_CHUNK_SIZE", "zero")

    status, out, err = _eval(capsys, "l1_loss", paths["pred"], paths["target"])

    _assert_usage_error(status, out, err, "FASTLOSS_CHUNK_SIZE must be an integer")


def test_eval_bad_chunk_size_option(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "l1_loss", paths["pred"], paths["target"],
                             "--chunk-size", 0)

    _assert_usage_error(status, out, err, "expected an integer >= 1, got '0'")


def test_eval_mean_of_zero_weight_is_nan(capsys, arrays, tmp_path):
    pred, target, _, paths = arrays()
    np.save(tmp_path / "zeros.npy", np.zeros_like(pred))

    report = _eval_json(capsys, "mse_loss", paths["pred"], paths["target"],
                        "--weight", tmp_path / "zeros.npy", "--chunk-size", 20,
                        "--grad-out", tmp_path / "grad.npy")

    assert report["loss"] is None
    assert report["weight_sum"] == 0.0
    np.testing.assert_array_equal(np.load(tmp_path / "grad.npy"), 0.0)


def test_eval_plain_output_of_nan(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.array([1.0, np.nan]))
    np.save(tmp_path / "t.npy", np.zeros(2))

    status, out, _ = _eval(capsys, "mse_loss", tmp_path / "p.npy", tmp_path / "t.npy")

    assert status == 0
    assert out == "nan\n"


@pytest.mark.parametrize("chunk_size", [20, 10**6])
def test_eval_none_prints_every_element(capsys, arrays, chunk_size):
    pred, target, _, paths = arrays()

    status, out, err = _eval(capsys, "huber_loss", paths["pred"], paths["target"],
                             "--reduction", "none", "--chunk-size", chunk_size)

    assert status == 0, err
    values = np.array(out.split(), dtype=np.float64)
    expected = fl.huber_loss(pred, target, reduction="none")
    np.testing.assert_array_equal(values, expected.reshape(-1))


def test_eval_none_json_is_nested_list(capsys, arrays):
    pred, target, _, paths = arrays(shape=(4, 3))

    report = _eval_json(capsys, "l1_loss", paths["pred"], paths["target"],
                        "--reduction", "none", "--chunk-size", 6)

    assert report["chunks"] == 2
    np.testing.assert_array_equal(np.array(report["loss"]),
                                  fl.l1_loss(pred, target, reduction="none"))


@pytest.mark.parametrize("chunk_size", [20, 10**6])
def test_eval_loss_out(capsys, arrays, tmp_path, chunk_size):
    pred, target, weight, paths = arrays()
    out_path = tmp_path / "losses.npy"

    report = _eval_json(capsys, "mse_loss", paths["pred"], paths["target"],
                        "--weight", paths["weight"], "--reduction", "none",
                        "--loss-out", out_path, "--chunk-size", chunk_size)

    assert report["loss"] is None
    assert report["loss_out"] == str(out_path)
    expected = fl.mse_loss(pred, target, weight=weight, reduction="none")
    np.testing.assert_allclose(np.load(out_path), expected, rtol=1e-15)


def test_eval_loss_out_needs_none(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--loss-out", tmp_path / "losses.npy")

    _assert_usage_error(status, out, err, "--loss-out needs --reduction none")


def test_eval_integer_and_float16_inputs(capsys, tmp_path, rng):
    pred16 = rng.standard_normal((30, 2)).astype(np.float16)
    target_int = rng.integers(-2, 3, (30, 2))
    np.save(tmp_path / "p.npy", pred16)
    np.save(tmp_path / "t.npy", target_int)

    report = _eval_json(capsys, "mse_loss", tmp_path / "p.npy", tmp_path / "t.npy",
                        "--chunk-size", 8)

    assert report["dtype"] == "float32"
    np.testing.assert_allclose(report["loss"],
                               float(fl.mse_loss(pred16, target_int)), rtol=2e-5)


def test_eval_npz_and_csv_inputs(capsys, tmp_path, rng):
    pred = rng.standard_normal((6, 2))
    target = rng.standard_normal((6, 2))
    np.savez(tmp_path / "data.npz", pred=pred, target=target)
    np.savetxt(tmp_path / "target.csv", target, delimiter=",", fmt="%.17g")

    from_npz = _eval_json(capsys, "mse_loss", f"{tmp_path / 'data.npz'}:pred",
                          f"{tmp_path / 'data.npz'}:target")
    from_csv = _eval_json(capsys, "mse_loss", f"{tmp_path / 'data.npz'}:pred",
                          tmp_path / "target.csv")

    assert from_npz["loss"] == float(fl.mse_loss(pred, target))
    assert from_csv["loss"] == from_npz["loss"]


def test_eval_0d_inputs(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.float64(3.0))
    np.save(tmp_path / "t.npy", np.float64(1.0))

    report = _eval_json(capsys, "mse_loss", tmp_path / "p.npy", tmp_path / "t.npy")

    assert report["loss"] == 4.0
    assert report["n"] == 1


def test_eval_empty_inputs(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.empty((0, 3)))
    np.save(tmp_path / "t.npy", np.empty((0, 3)))

    report = _eval_json(capsys, "mse_loss", tmp_path / "p.npy", tmp_path / "t.npy",
                        "--chunk-size", 2)

    assert report["loss"] is None
    assert report["n"] == 0


# --- eval: --grad-out --------------------------------------------------------


GRAD_CASES = [
    (name, params, reduction)
    for name, params in REGRESSION_CASES
    for reduction in ("mean", "sum", "none")
] + [("rmse_loss", {}, "mean"), ("rmse_loss", {}, "sum")]


@pytest.mark.parametrize("name, params, reduction", GRAD_CASES)
@pytest.mark.parametrize("chunk_size", [15, 10**6])
def test_grad_out_matches_library(capsys, arrays, tmp_path, name, params,
                                  reduction, chunk_size):
    pred, target, weight, paths = arrays()
    grad_path = tmp_path / "grad.npy"

    report = _eval_json(
        capsys, name, paths["pred"], paths["target"], "--weight", paths["weight"],
        "--reduction", reduction, "--grad-out", grad_path,
        "--chunk-size", chunk_size, *_params_args(params),
    )

    loss, grad = getattr(fl, name)(pred, target, weight=weight, reduction=reduction,
                                   return_grad=True, **params)
    written = np.load(grad_path)
    assert report["grad_out"] == str(grad_path)
    assert written.dtype == grad.dtype
    assert written.shape == grad.shape
    np.testing.assert_allclose(written, grad, rtol=1e-12, atol=1e-300)
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_grad_out_float32_chunked(capsys, arrays, tmp_path):
    pred, target, _, paths = arrays(np.float32)

    _eval_json(capsys, "mse_loss", paths["pred"], paths["target"],
               "--grad-out", tmp_path / "grad.npy", "--chunk-size", 10)

    _, grad = fl.mse_loss(pred, target, return_grad=True)
    written = np.load(tmp_path / "grad.npy")
    assert written.dtype == np.float32
    np.testing.assert_allclose(written, grad, rtol=1e-6)


def test_grad_out_rmse_at_zero_error(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.ones(10))

    report = _eval_json(capsys, "rmse_loss", tmp_path / "p.npy", tmp_path / "p.npy",
                        "--grad-out", tmp_path / "grad.npy", "--chunk-size", 3)

    assert report["loss"] == 0.0
    np.testing.assert_array_equal(np.load(tmp_path / "grad.npy"), np.zeros(10))


def test_grad_out_must_be_npy(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--grad-out", tmp_path / "grad.csv")

    _assert_usage_error(status, out, err, "--grad-out must name an .npy file")


def test_grad_out_directory_missing(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--grad-out", tmp_path / "no" / "grad.npy")

    _assert_usage_error(status, out, err, "--grad-out: directory not found")


def test_grad_out_may_not_overwrite_input(capsys, arrays):
    pred, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--grad-out", paths["pred"])

    _assert_usage_error(status, out, err, "is also an input file")
    np.testing.assert_array_equal(np.load(paths["pred"]), pred)


def test_grad_out_and_loss_out_differ(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--reduction", "none", "--grad-out", tmp_path / "a.npy",
                             "--loss-out", tmp_path / "a.npy")

    _assert_usage_error(status, out, err, "must name different files")


def test_grad_out_kept_when_loss_fails(capsys, tmp_path):
    # delta=0 fails in the first chunk, after the temporary file was created.
    np.save(tmp_path / "p.npy", np.zeros(10))
    previous = np.arange(3.0)
    np.save(tmp_path / "grad.npy", previous)

    status, out, err = _eval(capsys, "huber_loss", tmp_path / "p.npy",
                             tmp_path / "p.npy", "--param", "delta=0",
                             "--grad-out", tmp_path / "grad.npy", "--chunk-size", 3)

    _assert_usage_error(status, out, err, "huber_loss: ")
    np.testing.assert_array_equal(np.load(tmp_path / "grad.npy"), previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grad.npy", "p.npy"]


# --- eval: input errors ------------------------------------------------------


def test_eval_missing_file(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", tmp_path / "nowhere.npy",
                             paths["target"])

    _assert_usage_error(status, out, err, "PRED: file not found: ")


def test_eval_missing_weight_file(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--weight", tmp_path / "nowhere.npy")

    _assert_usage_error(status, out, err, "--weight: file not found: ")


def test_eval_unknown_format(capsys, arrays, tmp_path):
    _, _, _, paths = arrays()
    (tmp_path / "target.txt").write_text("1\n")

    status, out, err = _eval(capsys, "mse_loss", paths["pred"],
                             tmp_path / "target.txt")

    _assert_usage_error(status, out, err, "TARGET: unknown file format '.txt'")


@pytest.mark.parametrize("chunk_size", [7, 10**6])
def test_eval_shape_mismatch(capsys, tmp_path, chunk_size):
    np.save(tmp_path / "p.npy", np.zeros((20, 3)))
    np.save(tmp_path / "t.npy", np.zeros((20, 1)))

    status, out, err = _eval(capsys, "mse_loss", tmp_path / "p.npy",
                             tmp_path / "t.npy", "--chunk-size", chunk_size)

    # The whole shapes are reported, never those of a chunk.
    _assert_usage_error(status, out, err, "mse_loss: ")
    assert "(20, 3)" in err
    assert "(20, 1)" in err


def test_eval_weight_shape_mismatch(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((20, 3)))
    np.save(tmp_path / "w.npy", np.ones(3))

    status, out, err = _eval(capsys, "mse_loss", tmp_path / "p.npy",
                             tmp_path / "p.npy", "--weight", tmp_path / "w.npy",
                             "--chunk-size", 6)

    _assert_usage_error(status, out, err, "mse_loss: ")
    assert "weight" in err


def test_eval_complex_input(capsys, tmp_path):
    np.save(tmp_path / "p.npy", np.zeros(4, dtype=complex))
    np.save(tmp_path / "t.npy", np.zeros(4))

    status, out, err = _eval(capsys, "mse_loss", tmp_path / "p.npy",
                             tmp_path / "t.npy")

    _assert_usage_error(status, out, err, "mse_loss: ")
    assert "complex" in err


def test_eval_missing_arguments(capsys):
    status = cli.main(["eval", "mse_loss"])
    out, err = capsys.readouterr()

    _assert_usage_error(status, out, err, "the following arguments are required")


def test_eval_unknown_option(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--frobnicate")

    _assert_usage_error(status, out, err, "unrecognized arguments: --frobnicate")


def test_eval_bad_reduction(capsys, arrays):
    _, _, _, paths = arrays()

    status, out, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                             "--reduction", "max")

    _assert_usage_error(status, out, err, "invalid choice: 'max'")


# --- progress bar ------------------------------------------------------------


def test_progress_bar_for_many_chunks(capsys, arrays):
    _, _, _, paths = arrays(shape=(40, 1))

    status, _, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                           "--chunk-size", 1)

    assert status == 0
    assert "row" in err


def test_progress_bar_can_be_turned_off(capsys, arrays):
    _, _, _, paths = arrays(shape=(40, 1))

    status, _, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                           "--chunk-size", 1, "--no-progress")

    assert status == 0
    assert err == ""


def test_no_progress_bar_for_few_chunks(capsys, arrays):
    _, _, _, paths = arrays()

    status, _, err = _eval(capsys, "mse_loss", paths["pred"], paths["target"],
                           "--chunk-size", 20)

    assert status == 0
    assert err == ""


# --- classification losses ---------------------------------------------------

needs_cross_entropy = pytest.mark.skipif(
    not hasattr(fl, "cross_entropy"), reason="fastloss has no cross_entropy yet"
)


@needs_cross_entropy
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_chunked(capsys, tmp_path, rng, weighted, reduction):
    logits = rng.standard_normal((25, 4, 3))
    target = rng.integers(0, 4, (25, 3))
    target[rng.random((25, 3)) < 0.3] = -100
    class_weight = np.array([0.5, 1.0, 2.0, 0.0])
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "target.npy", target)
    np.save(tmp_path / "w.npy", class_weight)
    extra = ["--weight", tmp_path / "w.npy"] if weighted else []

    report = _eval_json(capsys, "cross_entropy", tmp_path / "logits.npy",
                        tmp_path / "target.npy", "--reduction", reduction,
                        "--chunk-size", 24, "--grad-out", tmp_path / "g.npy", *extra)

    loss, grad = fl.cross_entropy(logits, target, reduction=reduction,
                                  weight=class_weight if weighted else None,
                                  return_grad=True)
    assert report["chunks"] == 13
    assert report["n"] == int(np.count_nonzero(target != -100))
    np.testing.assert_allclose(report["loss"], float(loss), rtol=1e-12)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), grad, rtol=1e-12,
                               atol=1e-300)


@needs_cross_entropy
def test_cross_entropy_channels_last(capsys, tmp_path, rng):
    logits = rng.standard_normal((10, 3, 5))
    target = rng.integers(0, 5, (10, 3))
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "target.npy", target)

    report = _eval_json(capsys, "cross_entropy", tmp_path / "logits.npy",
                        tmp_path / "target.npy", "--param", "axis=-1",
                        "--param", "label_smoothing=0.1", "--chunk-size", 30)

    expected = fl.cross_entropy(logits, target, axis=-1, label_smoothing=0.1)
    assert report["chunks"] == 5
    np.testing.assert_allclose(report["loss"], float(expected), rtol=1e-12)


@needs_cross_entropy
def test_cross_entropy_weight_as_list(capsys, tmp_path, rng):
    logits = rng.standard_normal((12, 3))
    target = rng.integers(0, 3, 12)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "target.npy", target)

    report = _eval_json(capsys, "cross_entropy", tmp_path / "logits.npy",
                        tmp_path / "target.npy", "--param", "weight=0.5,1,2",
                        "--chunk-size", 9)

    expected = fl.cross_entropy(logits, target, weight=np.array([0.5, 1.0, 2.0]))
    assert report["chunks"] == 4
    assert report["params"] == {"weight": [0.5, 1, 2]}
    np.testing.assert_allclose(report["loss"], float(expected), rtol=1e-12)
    np.testing.assert_allclose(report["weight_sum"],
                               np.array([0.5, 1.0, 2.0])[target].sum())


@needs_cross_entropy
def test_cross_entropy_class_out_of_range(capsys, tmp_path, rng):
    np.save(tmp_path / "logits.npy", rng.standard_normal((10, 3)))
    np.save(tmp_path / "target.npy", np.full(10, 3))

    status, out, err = _eval(capsys, "cross_entropy", tmp_path / "logits.npy",
                             tmp_path / "target.npy", "--chunk-size", 6)

    _assert_usage_error(status, out, err, "cross_entropy: ")


needs_sigmoid = pytest.mark.skipif(
    not hasattr(fl, "binary_cross_entropy_with_logits"),
    reason="fastloss has no sigmoid losses yet",
)
needs_overlap = pytest.mark.skipif(
    not hasattr(fl, "dice_loss"), reason="fastloss has no overlap losses yet"
)


@needs_sigmoid
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_chunked_with_broadcast_weights(capsys, tmp_path, rng, reduction):
    logits = 3.0 * rng.standard_normal((21, 4))
    target = (rng.random((21, 4)) < 0.4).astype(np.float64)
    weight = rng.uniform(0.0, 2.0, (21, 1))
    pos_weight = np.array([1.0, 2.0, 0.5, 3.0])
    for name, a in (("x", logits), ("y", target), ("w", weight), ("pw", pos_weight)):
        np.save(tmp_path / f"{name}.npy", a)

    report = _eval_json(
        capsys, "binary_cross_entropy_with_logits", tmp_path / "x.npy",
        tmp_path / "y.npy", "--weight", tmp_path / "w.npy",
        "--param", f"pos_weight=@{tmp_path / 'pw.npy'}", "--reduction", reduction,
        "--chunk-size", 12, "--grad-out", tmp_path / "g.npy",
    )

    loss, grad = fl.binary_cross_entropy_with_logits(
        logits, target, weight=weight, pos_weight=pos_weight, reduction=reduction,
        return_grad=True,
    )
    assert report["chunks"] == 7
    assert report["n"] == logits.size
    np.testing.assert_allclose(np.array(report["loss"]), loss, rtol=1e-12)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), grad, rtol=1e-12,
                               atol=1e-300)


@needs_sigmoid
def test_sigmoid_focal_chunked(capsys, tmp_path, rng):
    logits = rng.standard_normal((30, 3))
    target = (rng.random((30, 3)) < 0.3).astype(np.float64)
    np.save(tmp_path / "x.npy", logits)
    np.save(tmp_path / "y.npy", target)

    report = _eval_json(capsys, "sigmoid_focal_loss", tmp_path / "x.npy",
                        tmp_path / "y.npy", "--param", "alpha=-1",
                        "--param", "gamma=1.5", "--chunk-size", 9)

    expected = fl.sigmoid_focal_loss(logits, target, alpha=-1, gamma=1.5)
    assert report["chunks"] == 10
    np.testing.assert_allclose(report["loss"], float(expected), rtol=1e-12)


@needs_sigmoid
def test_sigmoid_focal_takes_no_weight(capsys, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))

    status, out, err = _eval(capsys, "sigmoid_focal_loss", tmp_path / "x.npy",
                             tmp_path / "x.npy", "--weight", tmp_path / "x.npy")

    _assert_usage_error(status, out, err,
                        "--weight: sigmoid_focal_loss has no keyword 'weight'")


@needs_overlap
def test_dice_evaluated_whole(capsys, tmp_path, rng):
    logits = rng.standard_normal((6, 3, 4, 5))
    target = rng.integers(0, 3, (6, 4, 5))
    np.save(tmp_path / "x.npy", logits)
    np.save(tmp_path / "y.npy", target)

    report = _eval_json(capsys, "dice_loss", tmp_path / "x.npy", tmp_path / "y.npy",
                        "--param", "smooth=1.0", "--chunk-size", 10,
                        "--grad-out", tmp_path / "g.npy")

    loss, grad = fl.dice_loss(logits, target, smooth=1.0, return_grad=True)
    assert report["chunks"] == 1
    assert report["loss"] == float(loss)
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), grad)


# --- demo and bench ----------------------------------------------------------


def test_demo_prints_report(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")

    status = cli.main(["demo"])
    out, err = capsys.readouterr()

    assert status == 0, err
    assert "diabetes" in out
    assert "train huber" in out
    assert "LinearRegression" in out
    for name, _ in REGRESSION_CASES:
        assert f"  {name} " in out
    assert "rmse_loss" in out
    assert "Segmentation: coins" in out


def test_demo_without_scikit_learn(capsys, monkeypatch):
    from fastloss import demo

    real_find_spec = demo.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "sklearn" else real_find_spec(name, *args)

    monkeypatch.setattr(demo.importlib.util, "find_spec", find_spec)

    status = cli.main(["demo"])
    out, err = capsys.readouterr()

    _assert_usage_error(status, out, err, 'pip install "fastloss[demo]"')
    assert "sklearn" in err


def test_demo_fit_reduces_loss():
    pytest.importorskip("sklearn")
    from fastloss import demo

    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.standard_normal(200)

    w, b, history = demo.fit_linear_huber(x, y, steps=200, learning_rate=0.2,
                                          delta=1.0, report_every=100)

    assert [step for step, _ in history] == [0, 100, 200]
    assert history[-1][1] < 0.01 * history[0][1]
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=0.05)
    assert abs(b - 0.3) < 0.05


def test_bench_forwards_arguments(capsys, monkeypatch):
    received = []
    module = types.ModuleType("fastloss.benchmarks")
    module.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastloss.benchmarks", module)

    status = cli.main(["bench", "--quick", "--only", "mse_loss"])

    assert status == 3
    assert received == [["--quick", "--only", "mse_loss"]]


def test_bench_forwards_help(monkeypatch):
    received = []
    module = types.ModuleType("fastloss.benchmarks")
    module.main = received.append
    monkeypatch.setitem(sys.modules, "fastloss.benchmarks", module)

    status = cli.main(["bench", "--help"])

    assert status == 0
    assert received == [["--help"]]


def test_bench_without_benchmarks_module(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastloss.benchmarks", None)

    status = cli.main(["bench"])
    out, err = capsys.readouterr()

    _assert_usage_error(status, out, err, "needs the fastloss.benchmarks module")


# --- top level ---------------------------------------------------------------


def test_no_command(capsys):
    status = cli.main([])
    out, err = capsys.readouterr()

    _assert_usage_error(status, out, err, "a command is required, one of: eval")


def test_unknown_command(capsys):
    status = cli.main(["frobnicate"])
    out, err = capsys.readouterr()

    _assert_usage_error(status, out, err, "invalid choice: 'frobnicate'")


def test_help_exits_zero(capsys):
    status = cli.main(["--help"])
    out, _ = capsys.readouterr()

    assert status == 0
    assert "eval" in out
    assert "demo" in out
    assert "bench" in out


def test_eval_help_exits_zero(capsys):
    status = cli.main(["eval", "--help"])
    out, _ = capsys.readouterr()

    assert status == 0
    assert "--grad-out" in out


def test_version(capsys):
    status = cli.main(["--version"])
    out, _ = capsys.readouterr()

    assert status == 0
    assert out.strip() == f"fastloss {fl.__version__}"


def test_python_m_fastloss(tmp_path, rng):
    pred = rng.standard_normal((9, 2))
    target = rng.standard_normal((9, 2))
    np.save(tmp_path / "p.npy", pred)
    np.save(tmp_path / "t.npy", target)
    env = dict(os.environ, FASTLOSS_CHUNK_SIZE="4")

    done = subprocess.run(
        [sys.executable, "-m", "fastloss", "eval", "mse_loss",
         str(tmp_path / "p.npy"), str(tmp_path / "t.npy"), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    failed = subprocess.run(
        [sys.executable, "-m", "fastloss", "eval", "mse_loss",
         str(tmp_path / "nowhere.npy"), str(tmp_path / "t.npy")],
        capture_output=True, text=True, env=env, timeout=60,
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["chunks"] == 5
    np.testing.assert_allclose(report["loss"], float(fl.mse_loss(pred, target)),
                               rtol=1e-12)
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("fastloss: error: PRED: file not found")


def test_eval_class_error_points_to_diagnose(capsys, tmp_path):
    logits = np.zeros((2, 3, 4), np.float32)
    mask = np.zeros((2, 4), np.uint8)
    mask[0, 1] = 255
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "mask.npy", mask)

    status, out, err = _eval(
        capsys, "cross_entropy", tmp_path / "logits.npy", tmp_path / "mask.npy"
    )

    _assert_usage_error(status, out, err, "got 255 at position")
    assert "run 'fastloss diagnose " in err
    assert "--loss cross_entropy" in err


def test_eval_regression_error_has_no_diagnose_hint(capsys, tmp_path):
    np.save(tmp_path / "pred.npy", np.zeros(3))
    np.save(tmp_path / "target.npy", np.zeros(4))

    status, out, err = _eval(
        capsys, "mse_loss", tmp_path / "pred.npy", tmp_path / "target.npy"
    )

    assert status == 2
    assert "fastloss diagnose" not in err
