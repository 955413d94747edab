"""Writing NIfTI files: atomic, lossless for integer voxels, fast gzip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medidiff.io.atomic import atomic_path
from medidiff.volume import Volume

__all__ = ["write_image", "write_nifti"]


class _ForwardWriter:
    """A write-only stream nibabel can write a NIfTI into: seeks may only move forward (zero fill)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._pos = 0

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._pos += len(memoryview(data).cast("B"))
        return n

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:  # nibabel's file-like check wants both read and write
        raise OSError("the compressed output stream is write-only")

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos
        if whence not in (0, 1) or target < self._pos:
            raise OSError("backward seek on a compressed output stream")
        if target > self._pos:
            self.write(b"\0" * (target - self._pos))
        return self._pos

    def flush(self) -> None:
        self._f.flush()


def write_nifti(vol: Volume, path: Path) -> Path:
    """Write a NIfTI-1 file atomically. ``.nii.gz`` goes through ISA-L's threaded gzip when it is
    installed (about 2.5x faster than zlib at the same level; the output is ordinary gzip)."""
    img = vol.to_nibabel()  # integer voxels stay integer, with no scaling: lossless like dcm2niix
    with atomic_path(path) as tmp:
        write_image(img, tmp, gz=Path(path).name.endswith(".gz"))
    return path


def write_image(img: Any, path: Path, *, gz: bool, threads: int = 2) -> None:
    """Write a nibabel NIfTI image to ``path`` as it is (no temporary file; see :func:`write_nifti`)."""
    if gz:
        try:
            from isal import igzip_threaded
        except ImportError:
            igzip_threaded = None
        if igzip_threaded is not None:
            with igzip_threaded.open(path, "wb", compresslevel=1, threads=threads) as f:
                img.to_stream(_ForwardWriter(f))
            return
        import gzip

        with gzip.open(path, "wb", compresslevel=1) as f:
            img.to_stream(_ForwardWriter(f))
        return
    with open(path, "wb") as f:
        img.to_stream(f)
