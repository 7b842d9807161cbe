"""The package's own exceptions.

Each subclasses the built-in exception a caller would already catch (``ValueError`` for bad
arguments or settings, ``OSError`` for files), so ``except ValueError`` keeps working.
"""


class RagError(Exception):
    """Base class of every error raised on purpose by modeling_rag."""


class RagConfigError(RagError, ValueError):
    """A configuration value is unknown, out of range, or contradicts another one."""


class RagInputError(RagError, ValueError):
    """An argument passed to a public function is unusable (empty, wrong type, wrong shape)."""


class ContextOverflowError(RagInputError):
    """The question (plus the room for new tokens) does not fit the generator's window."""


class IndexMismatchError(RagError, ValueError):
    """An index does not fit the model or query it is used with (dimension, encoder, count)."""


class IndexIntegrityError(RagError, OSError):
    """An index or model folder is missing files, half-written, or fails its checksums."""


class SavedModelError(RagError, OSError):
    """A saved model folder lacks a part its config names (a tokenizer, the index) or holds a damaged weights file."""


class CorpusError(RagError, ValueError):
    """A corpus cannot be read or holds nothing to index."""


class DataFormatError(RagError, ValueError):
    """A questions / training file is unreadable, empty, or has rows missing required fields."""


class HubError(RagError, OSError):
    """A Hub repository, revision or file could not be fetched or written."""


class ShardIntegrityError(IndexIntegrityError):
    """A shard of a sharded index is missing, fails its manifest checksum, or does not match the manifest.

    `shard` is the shard number (None when the manifest itself is at fault).
    """

    def __init__(self, message: str, shard: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard


class ShardUnavailableError(RagError, RuntimeError):
    """A shard could not answer a query (its process or actor died); the results would be short of it.

    `shard` is the shard number.
    """

    def __init__(self, message: str, shard: int | None = None) -> None:
        super().__init__(message)
        self.shard = shard
