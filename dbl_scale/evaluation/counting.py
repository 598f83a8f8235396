"""Counting one tile of scores against per-row and per-column thresholds, the inner loop of the
tiled evaluation (`metrics.embedding_ranks`): per row, scores above / equal to the row's
threshold; per column, scores above / at least the column's; rows and columns with a NaN.

In one pass over the tile, by a 60-line C function (`tile_counts.c`) compiled with the
system's C compiler on first use and cached per machine; where there is no compiler, by numpy
in separate passes (the same counts, several times slower: at d = 128 the counting would cost
more than the product itself). Both add to the arrays they are given.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("tile_counts.c")
_lib: Optional[ctypes.CDLL] = None
_tried = False


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiled() -> Optional[ctypes.CDLL]:
    """The C function, built once per machine (the cache key: the source, the CPU's flags, the
    compiler) into ~/.cache/dbl_scale; None where no C compiler works."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or os.environ.get("DBL_SCALE_NO_C") == "1":
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode() + cc.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dbl_scale"
    lib = cache / f"tile_counts-{key}.so"
    try:
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                out = Path(tmp) / lib.name
                for flags in (["-O3", "-march=native"], ["-O3"]):  # an old compiler may not know -march=native
                    done = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", str(out), str(SOURCE)],
                                          capture_output=True, timeout=120)
                    if done.returncode == 0:
                        break
                else:
                    raise OSError(done.stderr.decode(errors="replace")[-500:])
                os.replace(out, lib)  # atomic: ranks building at once each rename a whole file
        handle = ctypes.CDLL(str(lib))
        p = ctypes.c_void_p
        handle.tile_counts.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, p, p, p, p, p, p, p]
        handle.tile_counts.restype = None
        _lib = handle
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the tile counting kernel did not build (%s): counting with numpy, several times slower", exc)
    return _lib


def native() -> bool:
    """Whether tiles are counted by the compiled C function."""
    return _compiled() is not None


def count_tile(s: np.ndarray, row_t: np.ndarray, col_t: np.ndarray, row_gt: np.ndarray, row_eq: np.ndarray,
               col_gt: np.ndarray, col_ge: np.ndarray, row_nan: Optional[np.ndarray] = None,
               col_nan: Optional[np.ndarray] = None, use_c: bool = True) -> None:
    """Add one tile's counts. s: rows x cols float32, C-contiguous; row_t / col_t: float32
    thresholds; row_gt, row_eq: int64 (rows,); col_gt, col_ge: int32 (cols,); row_nan,
    col_nan: uint8, or None where the caller knows the scores hold no NaN (then nothing looks
    for one). All contiguous (slices of larger arrays are fine)."""
    lib = _compiled() if use_c else None
    if lib is not None:
        arrays = (s, row_t, col_t, row_gt, row_eq, col_gt, col_ge) + ((row_nan, col_nan) if row_nan is not None else ())
        if all(a.flags.c_contiguous for a in arrays):
            lib.tile_counts(s.ctypes.data, s.shape[0], s.shape[1], *(a.ctypes.data for a in arrays[1:]),
                            *((None, None) if row_nan is None else ()))
            return
    above, col = s > row_t[:, None], col_t[None, :]
    row_gt += np.count_nonzero(above, axis=1)
    row_eq += np.count_nonzero(s == row_t[:, None], axis=1)
    col_gt += np.count_nonzero(s > col, axis=0).astype(np.int32)
    col_ge += np.count_nonzero(s >= col, axis=0).astype(np.int32)
    if row_nan is not None:
        nan = np.isnan(s)
        if nan.any():
            row_nan |= nan.any(axis=1)
            col_nan |= nan.any(axis=0)


class TileCounter:
    """`count_tile` for the tiles of one grid, each tile added at its row and column offset into
    arrays bound once, so a tile costs one C call (the per-call work of `count_tile`, checking
    and converting nine arrays, is a few percent of a tile's product). Tiles are torch float32
    tensors; the arrays as in `count_tile`, the row ones of one length and the column ones of
    another (checked here, since the C loop writes where it is told)."""

    def __init__(self, row_t: np.ndarray, col_t: np.ndarray, row_gt: np.ndarray, row_eq: np.ndarray,
                 col_gt: np.ndarray, col_ge: np.ndarray, row_nan: Optional[np.ndarray] = None,
                 col_nan: Optional[np.ndarray] = None):
        self.arrays = (row_t, col_t, row_gt, row_eq, col_gt, col_ge, row_nan, col_nan)
        by_row = (True, False, True, True, False, False, True, False)  # indexed by the tile's rows, or columns
        dtypes = (np.float32, np.float32, np.int64, np.int64, np.int32, np.int32, np.uint8, np.uint8)
        for i, (a, row, dtype) in enumerate(zip(self.arrays, by_row, dtypes)):
            if a is not None and (a.dtype != dtype or a.ndim != 1 or len(a) != len(row_t if row else col_t)):
                raise ValueError(f"array {i}: {a.dtype} of shape {a.shape}, expected {np.dtype(dtype)} of "
                                 f"length {len(row_t if row else col_t)}")
        self.lib = _compiled()
        if self.lib is not None and not all(a.flags.c_contiguous for a in self.arrays if a is not None):
            self.lib = None
        self.ptrs = [None if a is None else (a.ctypes.data, a.itemsize, row) for a, row in zip(self.arrays, by_row)]

    def add(self, s, r0: int, c0: int) -> None:
        if r0 + s.shape[0] > len(self.arrays[0]) or c0 + s.shape[1] > len(self.arrays[1]):
            raise IndexError(f"a {tuple(s.shape)} tile at ({r0}, {c0}) is outside {len(self.arrays[0])} x "
                             f"{len(self.arrays[1])}")
        if self.lib is None or not s.is_contiguous() or s.dtype != torch.float32 or s.device.type != "cpu":
            rows, cols = slice(r0, r0 + s.shape[0]), slice(c0, c0 + s.shape[1])
            a = self.arrays
            count_tile(np.ascontiguousarray(s.cpu().numpy(), np.float32), a[0][rows], a[1][cols], a[2][rows],
                       a[3][rows], a[4][cols], a[5][cols], None if a[6] is None else a[6][rows],
                       None if a[7] is None else a[7][cols], use_c=self.lib is not None)
            return
        self.lib.tile_counts(s.data_ptr(), s.shape[0], s.shape[1],
                             *(None if p is None else p[0] + p[1] * (r0 if p[2] else c0) for p in self.ptrs))
