"""er_core: the embedding-recycling library (no Ray here; pipelines/ builds on it)."""

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so `import er_core.cache` in a Ray Data task does not pay for
# torch and transformers: a worker that only reads the cache starts in a second, not in tens.
_EXPORTS = {
    "CacheReader": "cache",
    "CacheWriter": "cache",
    "open_cache": "cache",
    "repair_cache": "cache",
    "upgrade_cache": "cache",
    "ArtifactMismatchError": "errors",
    "CacheCorruptError": "errors",
    "CacheLockedError": "errors",
    "CacheMismatchError": "errors",
    "DataFormatError": "errors",
    "ErError": "errors",
    "LabelError": "errors",
    "LockLostError": "errors",
    "StorageError": "errors",
    "UnsupportedModelError": "errors",
    "CODECS": "codecs",
    "DEFAULT_CODEC": "codecs",
    "get_codec": "codecs",
    "TokenizerSettings": "keys",
    "example_key": "keys",
    "tokenizer_settings": "keys",
    "CacheSpec": "manifest",
    "Manifest": "manifest",
    "ShardInfo": "manifest",
    "lora_target_modules": "families",
    "supported_model_types": "families",
    "finetune": "finetuning",
    "DEFAULT_MODEL": "models",
    "load_encoder": "models",
    "Recycler": "recycle",
    "ingest_local": "recycle",
    "lower_fingerprint": "split",
    "resolve_layer": "split",
    "split_encoder": "split",
    "Example": "tasks",
    "LabelMap": "tasks",
    "Task": "tasks",
    "load_task": "tasks",
    "TrainConfig": "train_config",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
