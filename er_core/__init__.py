"""er_core: the embedding-recycling library (no Ray here; pipelines/ builds on it).

The public API is `__all__`: load and split a model, ingest into a cache and open it, load a task, train
from the cache, predict, export. Everything else sits in the submodules (the specific errors, all
subclasses of ErError, in `er_core.errors`).
"""

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so `import er_core.store` in a Ray Data task does not pay for
# torch and transformers: a worker that only reads the cache starts in a second, not in tens.
_EXPORTS = {
    "load_encoder": "models",  # a Hugging Face encoder by id or folder (the bundled MiniLM by default)
    "split_encoder": "split",  # lower (layers 0..k-1) and upper (k..L) parts, exact
    "Recycler": "recycle",  # a model split at k with its cache spec: embeds texts for a cache
    "ingest_local": "recycle",  # texts through the lower part into a cache, in this process
    "open_cache": "store",  # read a cache: manifest, key lookup, rows
    "CacheSpec": "store",  # what a cache holds: model, layer, codec, tokenizer
    "load_task": "tasks",  # a task folder: classification, NER or QA
    "Task": "tasks",
    "Example": "tasks",
    "TrainConfig": "train_config",  # how a task trains: method, lr, epochs, ...
    "finetune": "finetuning",  # train one task from the cache, in this process
    "MultiTaskPredictor": "predict",  # several trained tasks over one corpus, cache hits through the upper part only
    "export_model": "export",  # a trained model as one standard Hugging Face folder
    "ErError": "errors",  # every error er raises on purpose
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
