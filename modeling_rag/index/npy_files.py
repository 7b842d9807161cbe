""".npy arrays too large to hold: written batch by batch, read through a map tuned for random rows.

The exact float16 vectors of an IVF-PQ index (3.6 GiB at 5M x 384) are written once, in order, and then
read a few rows at a time (the candidates each query re-ranks). `np.lib.format.open_memmap` would keep
every written page in the building process's resident memory (a 5M build peaked at 5.1 GiB that way), so
`NpyAppender` writes with ordinary file writes. `map_npy` maps the file read-only with ``MADV_RANDOM``, so
that reading a re-ranked row from a cold cache does not read ahead around it. Pages already in the page
cache are still mapped a whole folio at a time and count in VmRSS (reclaimable, not the process's own
memory; see docs/benchmarks.md).
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np

__all__ = ["NpyAppender", "map_npy"]


class NpyAppender:
    """Writes a C-ordered ``.npy`` file of a known `shape` from consecutive blocks of rows."""

    def __init__(self, path: str | os.PathLike, dtype: Any, shape: tuple[int, ...]) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.rows = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._file, header)

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"a block of shape {block.shape} does not fit {self.shape} after {self.rows} rows")
        self._file.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        """Closes the file (the caller checks that `rows` reached the header's count)."""
        self._file.close()


def map_npy(path: str | os.PathLike) -> np.ndarray:
    """A read-only array over the ``.npy`` file at `path`, memory-mapped for random access.

    Raises `ValueError` for a file that is not a C-ordered ``.npy`` of plain numbers or is shorter than its
    header says (object arrays, which would need pickle, are refused by `read_array_header`)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError("not a C-ordered array of numbers")
        count = int(np.prod(shape, dtype=np.int64))
        size = os.fstat(f.fileno()).st_size
        if size < offset + count * dtype.itemsize:
            raise ValueError(f"the file holds {size - offset} bytes of data, the header needs {count * dtype.itemsize}")
        if count == 0:
            return np.zeros(shape, dtype=dtype)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)  # no disk read-ahead around each re-ranked row
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
