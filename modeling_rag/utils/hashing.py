"""Digests of files: the sha256 that index checksums, the GGUF asset check and Hub downloads verify."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks of `block_size` bytes (1 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()
