"""The frozen lower part and the cache spec it defines, plus the plain single-process ingestion loop.

`ingest_local` is the reference the Ray pipeline is tested and benchmarked against, and
what runs when no Ray is wanted.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .store import CacheWriter
from .corpus import KeyClaims
from .store import DEFAULT_CODEC, get_codec
from .embed import Embedder, Tokenized, is_empty, tokenize, tokenize_rows
from .errors import ErError
from .keys import example_key, tokenizer_settings, window_key
from .store import CacheSpec, Manifest
from .models import DEFAULT_MODEL, load_encoder

if TYPE_CHECKING:
    import torch


@dataclass
class Recycler:
    spec: CacheSpec
    encoder: torch.nn.Module
    tokenizer: object
    lower: torch.nn.Module

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, layer="0.5", codec: str = DEFAULT_CODEC, max_length: int | None = None,
             revision: str | None = None) -> "Recycler":
        get_codec(codec)
        encoder, tokenizer = load_encoder(model, revision)
        return cls.from_encoder(encoder, tokenizer, model, layer, codec, max_length, revision)

    @classmethod
    def from_encoder(cls, encoder, tokenizer, name: str, layer, codec=DEFAULT_CODEC, max_length=None,
                     revision: str | None = None) -> "Recycler":
        from .families import num_layers  # torch: here, where a model is at hand, not at import
        from .split import lower_fingerprint, resolve_layer, split_encoder

        k = resolve_layer(layer, num_layers(encoder.config))
        lower, _ = split_encoder(encoder, k)
        spec = CacheSpec(
            model_name=name,
            model_type=encoder.config.model_type,
            lower_fingerprint=lower_fingerprint(lower),
            layer=k,
            num_layers=num_layers(encoder.config),
            hidden_size=encoder.config.hidden_size,
            tokenizer=tokenizer_settings(tokenizer, name, max_length),
            codec=codec,
            model_revision=revision,
        )
        return cls(spec, encoder, tokenizer, lower)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def key(self, inputs: dict) -> str:
        return example_key(inputs, self.spec.tokenizer)

    def tokenize(self, inputs: list[dict]):
        return tokenize(self.tokenizer, inputs, self.spec.tokenizer.max_length)

    def rows(self, inputs: list[dict], keys: list[str] | None = None) -> list[tuple[str, Tokenized]]:
        """(key, tokens) of every cache row of `inputs`: one each, or one per window of a strided QA input.
        `keys`: the inputs' own (e.g. ids from --id-field), which their first rows keep; default `self.key`."""
        return cache_rows(self.tokenizer, self.spec.tokenizer, inputs, keys)

    def embedder(self, device: str = "cpu", autocast=None) -> Embedder:
        return Embedder(self.lower, self.pad_id, device=device, autocast=autocast)


def cache_spec(model: str = DEFAULT_MODEL, layer="0.5", codec: str = DEFAULT_CODEC, max_length: int | None = None,
               revision: str | None = None, fresh: bool = False) -> CacheSpec:
    """`Recycler.load(...).spec`, without loading the model when its folder's spec is remembered (model_specs).
    `fresh`: load it, and remember what it gives (after a worker found the remembered spec wrong)."""
    from .model_specs import remembered
    from .models import resolve_model

    get_codec(codec)

    def args(layer, max_length) -> dict:
        return {"model": str(model), "layer": str(layer), "codec": codec, "revision": revision,
                "max_length": None if max_length is None else int(max_length)}

    folder = resolve_model(str(model))
    # Also under the layer and max length it resolved to: what a cache's spec (er train's check) asks with.
    return remembered(folder if os.path.isdir(folder) else None, args(layer, max_length),
                      lambda: Recycler.load(model, layer, codec, max_length, revision).spec,
                      lambda spec: [args(spec.layer, spec.tokenizer.max_length)], fresh=fresh)


def cache_rows(tokenizer, settings, inputs: list[dict], keys: list[str] | None = None) -> list[tuple[str, Tokenized]]:
    """Recycler.rows with only a tokenizer and its settings (keys.TokenizerSettings): what ingestion's CPU stage needs."""
    keys = [example_key(x, settings) for x in inputs] if keys is None else list(keys)
    return [(keys[i] if w == 0 else window_key(inputs[i], settings, w), t)
            for i, w, t in tokenize_rows(tokenizer, inputs, settings.max_length)]


def ingest_local(
    inputs: Iterable[dict],
    url: str,
    recycler: Recycler,
    storage_options: dict | None = None,
    batch_size: int = 256,
    progress: bool = True,
    total: int | None = None,
    stats: dict | None = None,
    known: Manifest | None = None,
    device: str = "cpu",
) -> Manifest:
    """Add every input not yet cached to the cache at `url`, in one process. Empty texts are skipped and counted.

    Inputs with no non-empty text at all are refused before the cache is touched: no lock, no folder, no manifest.
    `known`: the cache's state as the caller opened it (only later commits are read). `device`: where the lower
    layers run (cuda on a GPU machine; `er ingest` on Ray places its actors itself).
    """
    inputs, empty = _first_usable(inputs)
    if inputs is None:
        raise ErError(f"nothing to ingest into {url}: " + (f"all {empty} inputs have an empty text" if empty else "no inputs")
                      + "; check the corpus and its text field. Nothing was written")
    embed = recycler.embedder(device)
    with CacheWriter(url, recycler.spec, storage_options, known=known) as writer:
        seen = KeyClaims(index=writer.reader().index)  # asks the key index: no hidden state is read
        if empty:
            writer.count_skipped("empty_text", empty)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="ingest", unit="ex", initial=empty)
        buf: list[tuple[str, dict]] = []

        def run():
            rows = recycler.rows([inp for _, inp in buf], [key for key, _ in buf])
            states = embed([t.input_ids for _, t in rows], [t.type_ids for _, t in rows])
            for (key, t), h in zip(rows, states):
                writer.add(key, t.input_ids, h, t.truncated)
            buf.clear()

        for inp in inputs:
            if bar is not None:
                bar.update(1)
            if is_empty(inp):
                writer.count_skipped("empty_text")
                continue
            key = recycler.key(inp)
            if not seen.claim([key])[0]:  # cached, or met earlier in this run
                continue
            buf.append((key, inp))
            if len(buf) >= batch_size:
                run()
        if buf:
            run()
        if bar is not None:
            bar.close()
        if stats is not None:
            stats.update(seen.stats())  # "claimed": the new inputs (a strided QA input writes a row per window)
    return writer.manifest


def _first_usable(inputs: Iterable[dict]):
    """(inputs from the first non-empty one on, empties before it); (None, empties) when there is none."""
    it, empty = iter(inputs), 0
    for inp in it:
        if not is_empty(inp):
            return itertools.chain([inp], it), empty
        empty += 1
    return None, empty


def ensure_cached(url: str, inputs: list[dict], storage_options: dict | None = None) -> int:
    """Ingest, with the cache's own model and settings, the inputs it lacks; returns how many were added."""
    from .store import open_cache

    reader = open_cache(url, storage_options=storage_options)
    s = reader.spec
    rec = Recycler.load(s.model_name, s.layer, s.codec, s.tokenizer.max_length, s.model_revision)
    usable = [i for i in inputs if not is_empty(i)]
    have = reader.contains(rec.key(i) for i in usable)  # through the key index
    missing = [i for i in usable if rec.key(i) not in have]
    if missing:
        ingest_local(missing, url, rec, storage_options, progress=False)
    return len(missing)
