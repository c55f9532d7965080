"""Error types. All are ValueError subclasses so callers can catch bad input in one place."""


class ErError(ValueError):
    """Base class for every error er raises about bad input or state."""


class UnsupportedModelError(ErError):
    """The encoder's architecture has no row in the family table."""


class CacheMismatchError(ErError):
    """A cache was opened with a model, layer or tokenizer it was not built with."""


class CacheCorruptError(ErError):
    """A manifest or shard failed its integrity check."""


class CacheFormatError(CacheCorruptError):
    """A cache written in an older format; `er cache upgrade` rewrites it."""


class CacheLockedError(ErError):
    """Another writer holds the cache's lock."""


class DataFormatError(ErError):
    """A task or corpus file is malformed; the message names file and line."""


class LabelError(ErError):
    """A label was not seen in training."""


class ArtifactMismatchError(ErError):
    """A trained artefact was loaded against a cache with another fingerprint."""


class LockLostError(ErError):
    """Another writer took this writer's lock; it stops and commits nothing more."""


class StorageError(ErError):
    """A storage fault (unreachable endpoint, credentials, permissions, a path that is a file), in one line."""
