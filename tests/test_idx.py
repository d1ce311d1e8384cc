"""IDX reader: round trip, declared shapes, clear errors on truncated or foreign files."""

import gzip

import numpy as np
import pytest

from vpns_jax.data.idx import read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def test_round_trip_raw_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw-idx3-ubyte").write_bytes(_idx_bytes(images))
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(_idx_bytes(images))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    ints = np.asarray([1, -2, 70000], ">i4")
    (tmp_path / "ints").write_bytes(_idx_bytes(ints))
    assert read_idx(tmp_path / "ints").tolist() == [1, -2, 70000]


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    data = _idx_bytes(np.zeros((4, 5), np.uint8))
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(data)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")
