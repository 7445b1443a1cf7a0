"""Load arrays from files and walk aligned arrays in chunks.

Supported formats, chosen by the file's suffix:

``.npy``
    Opened as a read-only memory map (``np.load(mmap_mode="r")``), so a file
    larger than memory can be read chunk by chunk.
``.npz``
    An archive that contains one array, or several arrays of which one is named as
    ``file.npz:key``. The chosen array is read into memory, because NumPy
    cannot memory-map a member of a zip archive.
``.csv``
    Comma-separated numbers read with ``np.loadtxt``. Lines that start with
    ``#`` are comments. The result is 1-D for a single row or column and
    2-D otherwise.

Pickled objects are never loaded.
"""

import os
import zipfile

import numpy as np

__all__ = ["FORMATS", "load_array", "split_spec", "iter_chunks", "rows_per_chunk"]

FORMATS = (".npy", ".npz", ".csv")


def load_array(spec):
    """Load the array that ``spec`` names.

    Parameters
    ----------
    spec : str or os.PathLike
        A path ending in ``.npy``, ``.npz`` or ``.csv``. For an ``.npz``
        archive with several arrays, append ``:key`` to choose one.

    Returns
    -------
    numpy.ndarray
        A read-only ``numpy.memmap`` for ``.npy`` files, an in-memory array
        otherwise.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the suffix is not a supported format, the ``.npz`` key is missing
        or ambiguous, or the file cannot be parsed as a numeric array.
    """
    path, key = split_spec(os.fspath(spec))
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"unknown file format {suffix or '(no suffix)'!r} for {path!r};"
            f" expected one of {', '.join(FORMATS)}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"expected a file, got the directory {path!r}")

    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".npz":
        return _load_npz(path, key)
    return _load_csv(path)


def split_spec(spec):
    """Split ``"file.npz:key"`` into ``("file.npz", "key")``.

    A spec without a key returns ``(spec, None)``.

    Only a colon after an ``.npz`` suffix starts a key, so Windows drive
    letters (``C:\\data\\x.npy``) pass through unchanged.
    """
    lower = spec.lower()
    cut = lower.rfind(".npz:")
    if cut == -1:
        return spec, None
    return spec[: cut + 4], spec[cut + 5 :]


def _load_npy(path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"cannot read {path!r} as an .npy array: {exc}") from None


def _load_npz(path, key):
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path!r} as an .npz archive: {exc}") from None
    with archive:
        names = list(archive.files)
        if key is None:
            if len(names) != 1:
                listed = ", ".join(names) if names else "none"
                raise ValueError(
                    f"{path!r} contains {len(names)} arrays ({listed});"
                    f" choose one as {path}:KEY"
                )
            key = names[0]
        elif key not in names:
            raise ValueError(
                f"{path!r} has no array named {key!r};"
                f" it contains: {', '.join(names) or 'none'}"
            )
        try:
            return archive[key]
        except ValueError as exc:
            raise ValueError(f"cannot read {key!r} from {path!r}: {exc}") from None


def _load_csv(path):
    try:
        return np.loadtxt(path, delimiter=",", ndmin=1)
    except ValueError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"cannot read {path!r} as numeric CSV: {message}"
        ) from None


def rows_per_chunk(shape, max_elements):
    """Return how many first-axis rows fit in ``max_elements`` elements.

    At least one row is returned, so a single row larger than the budget
    still makes one chunk.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    row_size = 1
    for n in shape[1:]:
        row_size *= n
    if row_size == 0:
        return max(shape[0], 1) if shape else 1
    return max(1, max_elements // row_size)


def iter_chunks(arrays, rows):
    """Yield ``(start, stop, chunks)`` over the first axis of aligned arrays.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray or None
        Arrays with the same length along their first axis. ``None`` entries
        are passed through as ``None`` in every chunk.
    rows : int
        Rows per chunk, 1 or more. The last chunk may be shorter.

    Yields
    ------
    start, stop : int
        The rows ``[start, stop)`` of this chunk.
    chunks : list
        ``a[start:stop]`` for each array, a view that copies nothing.

    Raises
    ------
    ValueError
        If an array is 0-d or the first-axis lengths differ.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    present = [a for a in arrays if a is not None]
    if not present:
        return
    for a in present:
        if a.ndim == 0:
            raise ValueError("cannot chunk a 0-d array along its first axis")
    lengths = {a.shape[0] for a in present}
    if len(lengths) != 1:
        shapes = ", ".join(str(a.shape) for a in present)
        raise ValueError(
            f"arrays must have the same length along the first axis, got {shapes}"
        )
    n = lengths.pop()
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        yield start, stop, [None if a is None else a[start:stop] for a in arrays]
