"""er_core: the embedding-recycling library (no Ray here; pipelines/ builds on it)."""

__version__ = "0.1.0"

from .cache import CacheReader, CacheWriter, open_cache, repair_cache, upgrade_cache  # noqa: E402
from .codecs import CODECS, DEFAULT_CODEC, get_codec  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactMismatchError,
    CacheCorruptError,
    CacheLockedError,
    CacheMismatchError,
    DataFormatError,
    ErError,
    LabelError,
    LockLostError,
    StorageError,
    UnsupportedModelError,
)
from .keys import TokenizerSettings, example_key, tokenizer_settings  # noqa: E402
from .manifest import CacheSpec, Manifest, ShardInfo  # noqa: E402
from .families import lora_target_modules, supported_model_types  # noqa: E402
from .finetune import finetune  # noqa: E402
from .models import DEFAULT_MODEL, load_encoder  # noqa: E402
from .recycle import Recycler, ingest_local  # noqa: E402
from .split import lower_fingerprint, resolve_layer, split_encoder  # noqa: E402
from .tasks import Example, LabelMap, Task, load_task  # noqa: E402
from .train import TrainConfig  # noqa: E402

__all__ = [
    "Example",
    "LabelMap",
    "Recycler",
    "Task",
    "TrainConfig",
    "finetune",
    "ingest_local",
    "load_task",
    "lora_target_modules",
    "lower_fingerprint",
    "resolve_layer",
    "split_encoder",
    "supported_model_types",
    "ArtifactMismatchError",
    "CODECS",
    "CacheCorruptError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "DEFAULT_CODEC",
    "DEFAULT_MODEL",
    "DataFormatError",
    "ErError",
    "LabelError",
    "LockLostError",
    "Manifest",
    "ShardInfo",
    "StorageError",
    "TokenizerSettings",
    "UnsupportedModelError",
    "example_key",
    "get_codec",
    "load_encoder",
    "open_cache",
    "repair_cache",
    "tokenizer_settings",
    "upgrade_cache",
]
