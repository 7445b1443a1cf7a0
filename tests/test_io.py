import numpy as np
import pytest

from fastloss import io as fio


def test_npy_is_memory_mapped_read_only(tmp_path, rng):
    expected = rng.standard_normal((5, 3))
    path = tmp_path / "a.npy"
    np.save(path, expected)

    loaded = fio.load_array(str(path))

    assert isinstance(loaded, np.memmap)
    assert not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, expected)


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i8", "|u1", "<f2"])
def test_npy_round_trip_keeps_dtype(tmp_path, dtype):
    expected = np.arange(12).reshape(3, 4).astype(dtype)
    path = tmp_path / "a.npy"
    np.save(path, expected)

    loaded = fio.load_array(path)

    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, expected)


def test_npy_zero_size_and_0d(tmp_path):
    np.save(tmp_path / "empty.npy", np.empty((0, 4)))
    np.save(tmp_path / "scalar.npy", np.float64(2.5))

    assert fio.load_array(tmp_path / "empty.npy").shape == (0, 4)
    scalar = fio.load_array(tmp_path / "scalar.npy")
    assert scalar.shape == ()
    assert float(scalar) == 2.5


def test_npy_with_objects_is_rejected(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(ValueError, match="cannot read .*objects.npy.* as an .npy"):
        fio.load_array(path)


def test_npz_single_array_needs_no_key(tmp_path, rng):
    expected = rng.standard_normal(7)
    path = tmp_path / "one.npz"
    np.savez(path, only=expected)

    np.testing.assert_array_equal(fio.load_array(path), expected)
    np.testing.assert_array_equal(fio.load_array(f"{path}:only"), expected)


def test_npz_named_key(tmp_path, rng):
    a, b = rng.standard_normal(3), rng.standard_normal((2, 2))
    path = tmp_path / "two.npz"
    np.savez_compressed(path, pred=a, target=b)

    np.testing.assert_array_equal(fio.load_array(f"{path}:pred"), a)
    np.testing.assert_array_equal(fio.load_array(f"{path}:target"), b)


def test_npz_several_arrays_without_key(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, pred=np.zeros(2), target=np.ones(2))

    with pytest.raises(ValueError, match=r"contains 2 arrays \(pred, target\).*:KEY"):
        fio.load_array(path)


def test_npz_missing_key(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, pred=np.zeros(2), target=np.ones(2))

    with pytest.raises(ValueError, match="no array named 'weight'.*pred, target"):
        fio.load_array(f"{path}:weight")


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not a zip archive")

    with pytest.raises(ValueError, match="cannot read .*bad.npz"):
        fio.load_array(path)


def test_csv_two_dimensional(tmp_path, rng):
    expected = rng.standard_normal((4, 3))
    path = tmp_path / "a.csv"
    np.savetxt(path, expected, delimiter=",", fmt="%.17g", header="x,y,z")

    loaded = fio.load_array(path)

    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, expected)


def test_csv_one_column_and_one_row_are_1d(tmp_path):
    (tmp_path / "column.csv").write_text("1\n2\n3\n")
    (tmp_path / "row.csv").write_text("1,2,3\n")
    (tmp_path / "single.csv").write_text("4.5\n")

    np.testing.assert_array_equal(fio.load_array(tmp_path / "column.csv"), [1, 2, 3])
    np.testing.assert_array_equal(fio.load_array(tmp_path / "row.csv"), [1, 2, 3])
    np.testing.assert_array_equal(fio.load_array(tmp_path / "single.csv"), [4.5])


def test_csv_not_numeric(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("a,b\n1,2\n")

    with pytest.raises(ValueError, match="cannot read .*words.csv.* as numeric CSV"):
        fio.load_array(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*nowhere.npy"):
        fio.load_array(tmp_path / "nowhere.npy")


def test_directory_is_rejected(tmp_path):
    folder = tmp_path / "folder.npy"
    folder.mkdir()

    with pytest.raises(ValueError, match="expected a file, got the directory"):
        fio.load_array(folder)


@pytest.mark.parametrize("name", ["a.txt", "a.NPYX", "noext"])
def test_unknown_format(tmp_path, name):
    path = tmp_path / name
    path.write_text("1\n")

    with pytest.raises(ValueError, match="unknown file format .*expected one of .npy"):
        fio.load_array(path)


def test_key_on_a_file_that_is_not_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(2))

    with pytest.raises(ValueError, match="unknown file format"):
        fio.load_array(f"{tmp_path / 'a.npy'}:key")


def test_uppercase_suffix(tmp_path):
    path = tmp_path / "A.NPY"
    with open(path, "wb") as f:
        np.save(f, np.arange(3.0))

    np.testing.assert_array_equal(fio.load_array(path), [0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a.npy", ("a.npy", None)),
        ("data/a.npz", ("data/a.npz", None)),
        ("data/a.npz:pred", ("data/a.npz", "pred")),
        ("C:\\data\\a.npz:pred", ("C:\\data\\a.npz", "pred")),
        ("C:\\data\\a.npy", ("C:\\data\\a.npy", None)),
        ("x.NPZ:k", ("x.NPZ", "k")),
    ],
)
def test_split_spec(spec, expected):
    assert fio.split_spec(spec) == expected


def test_iter_chunks_covers_rows_with_views(rng):
    a = rng.standard_normal((10, 3))
    b = rng.standard_normal((10,))

    seen = []
    for start, stop, (ca, none, cb) in fio.iter_chunks([a, None, b], 4):
        assert none is None
        assert np.shares_memory(ca, a)
        np.testing.assert_array_equal(ca, a[start:stop])
        np.testing.assert_array_equal(cb, b[start:stop])
        seen.append((start, stop))

    assert seen == [(0, 4), (4, 8), (8, 10)]


def test_iter_chunks_empty_first_axis():
    assert list(fio.iter_chunks([np.empty((0, 2))], 3)) == []


def test_iter_chunks_rejects_misaligned():
    with pytest.raises(ValueError, match=r"same length .*\(3,\), \(4, 2\)"):
        list(fio.iter_chunks([np.zeros(3), np.zeros((4, 2))], 2))


def test_iter_chunks_rejects_0d():
    with pytest.raises(ValueError, match="0-d array"):
        list(fio.iter_chunks([np.float64(1.0)], 2))


def test_iter_chunks_rejects_bad_rows():
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        list(fio.iter_chunks([np.zeros(3)], 0))


@pytest.mark.parametrize(
    "shape, budget, expected",
    [
        ((100,), 7, 7),
        ((100, 10), 35, 3),
        ((100, 10), 5, 1),
        ((5, 0), 3, 5),
        ((0,), 3, 3),
    ],
)
def test_rows_per_chunk(shape, budget, expected):
    assert fio.rows_per_chunk(shape, budget) == expected


def test_rows_per_chunk_rejects_zero_budget():
    with pytest.raises(ValueError, match="max_elements must be >= 1"):
        fio.rows_per_chunk((3,), 0)
