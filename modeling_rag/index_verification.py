"""Compatibility module: folder verification moved to `modeling_rag.index.verification`."""

from .index.verification import VERIFIED_DIR, file_stamp, folder_stamp, is_trusted, remember_verified, sha256_file  # noqa: F401
