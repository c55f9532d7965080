"""`er serve`: recycled inference online, on Ray Serve. Cached documents run the served models' upper layers only.

    HTTP (FastAPI ingress `Api`) or a DeploymentHandle
      -> Upper: dynamic batches (@serve.batch); one Lookup call per batch; misses through the lower layers here
           -> Lookup: keys -> cached states (key index + row reads, an LRU of recent rows; follows new cache versions)
      -> MissLog: texts the cache lacked, appended as JSONL files beside the cache for the next `er ingest`

Misses run on the Upper replica: it holds the lower layers anyway (they came with the model folders), and a
deployment of their own would send every miss's states (length x hidden floats) across processes once more.
The request path never writes the cache. `app(settings)` is the application builder `serve deploy` and a
RayService call (`er serve --print-serve-config` prints that config).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at runtime.
import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from er_core.errors import ErError
from pipelines.configs import ServeConfig

log = logging.getLogger("er.serve")
INPUT_FORMS = {"classification": ("text", "words", "pair"), "ner": ("words",), "qa": ("question",)}


# ---------------------------------------------------------------- documents


class BadRequest(ErError):
    """A request er refuses with a 4xx and this one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_documents(body, max_documents: int) -> list[dict]:
    """The request's documents as er inputs: {"text"}, {"text", "text_pair"} (a pair to classify), {"words"} (NER),
    {"question", "context"} (QA), or {"id"}: a key of a cache ingested with --id-field."""
    if not isinstance(body, dict) or not isinstance(body.get("documents"), list):
        raise BadRequest('expected a JSON object {"documents": [...]}')
    docs = body["documents"]
    if not docs:
        raise BadRequest("documents is empty")
    if len(docs) > max_documents:
        raise BadRequest(f"{len(docs)} documents in one request; at most {max_documents} (max_documents)", 413)
    return [_document(d, i) for i, d in enumerate(docs)]


def _document(d, i: int) -> dict:
    where = f"documents[{i}]"
    if not isinstance(d, dict):
        raise BadRequest(f"{where}: expected an object, got {type(d).__name__}")
    fields = set(d) - {"ref"}
    if fields == {"text"} and isinstance(d["text"], str) and d["text"].strip():
        return {"form": "text", "input": {"text": d["text"]}, "ref": d.get("ref")}
    if fields == {"text", "text_pair"} and all(isinstance(d[k], str) and d[k].strip() for k in fields):
        from er_core.tasks import pair_input

        return {"form": "pair", "input": pair_input(d["text"], d["text_pair"]), "ref": d.get("ref")}
    if fields == {"words"} and isinstance(d["words"], list) and d["words"] and all(isinstance(w, str) for w in d["words"]):
        return {"form": "words", "input": {"words": d["words"]}, "ref": d.get("ref")}
    if fields == {"question", "context"} and all(isinstance(d[k], str) and d[k].strip() for k in fields):
        from er_core.tasks import DOC_STRIDE

        # as a QA task folder's examples are keyed: a long context read in windows (er_core.tasks.read_squad)
        return {"form": "question", "input": {"text": d["question"], "text_pair": d["context"], "stride": DOC_STRIDE},
                "ref": d.get("ref")}
    if fields == {"id"} and isinstance(d["id"], (str, int)) and not isinstance(d["id"], bool) and str(d["id"]):
        return {"form": "id", "id": str(d["id"]), "ref": d.get("ref")}
    raise BadRequest(f"{where}: expected one of text, text + text_pair, words (a list of strings), question + context, "
                     f"or id (non-empty), optionally with ref; got fields {sorted(d)}")


def _example(doc: dict, n: int):
    from er_core.tasks import Example

    d = doc["input"]
    return Example(id=str(n), **{k: (tuple(v) if k == "words" else v) for k, v in d.items()})


# Above the deployments: Serve pickles a deployment's class where it is declared, with the globals defined by then.
def chunks(docs: list, max_batch_size: int) -> list[list]:
    """A request's documents in near-equal calls of at most half a batch: a call as big as a whole batch would fit
    only an empty one, and under load from small requests it would wait behind them again and again."""
    n = max(1, max_batch_size // 2)
    k = -(-len(docs) // n)
    return [docs[i * len(docs) // k:(i + 1) * len(docs) // k] for i in range(k)]


def decode_rows(rows: tuple[str, list], hidden_size: int) -> list:
    """Lookup's answer -> float32 states per key (None where the cache lacks it)."""
    from er_core.store import get_codec

    codec = get_codec(rows[0])
    return [None if r is None else codec.decode(r[1], r[2], (r[0], hidden_size)) for r in rows[1]]


# ---------------------------------------------------------------- deployments


@serve.deployment(name="Lookup")
class Lookup:
    """Keys -> cached states of one cache version, with a bounded LRU of recent rows. Every `refresh_s` it opens the
    latest version (a checkpoint and a few commits, not the shards), so rows committed since are found. Rows stay
    encoded as cached and Upper decodes them: with fp16 the LRU holds, and Upper receives, half the bytes of
    float32 (int8 about a quarter)."""

    def __init__(self, cache: str, storage_options: dict | None, lru_rows: int, refresh_s: float):
        from er_core.store import open_cache

        self.url, self.opts, self.lru_rows, self.refresh_s = cache, storage_options, lru_rows, refresh_s
        self.reader = open_cache(cache, storage_options=storage_options)
        self.opened = time.monotonic()
        self.rows: OrderedDict[str, tuple] = OrderedDict()

    def _refresh(self) -> None:
        from er_core.store import open_cache

        if time.monotonic() - self.opened >= self.refresh_s:
            self.opened = time.monotonic()
            latest = open_cache(self.url, storage_options=self.opts)
            if latest.version != self.reader.version:
                self.reader = latest  # the LRU stays: a key's states never change

    def version(self) -> int:
        self._refresh()
        return self.reader.version

    def get(self, keys: list[str]) -> tuple[str, list[tuple | None]]:
        """The cache's codec, and encoded states per key: (length, hidden bytes, scale bytes or None), None where the
        cache lacks it. The codec comes along since the Lookup follows cache versions and Upper does not."""
        self._refresh()
        out: dict[str, tuple] = {}
        for k in keys:
            if k in self.rows:
                self.rows.move_to_end(k)
                out[k] = self.rows[k]
        todo = list(dict.fromkeys(k for k in keys if k not in out))
        if todo:
            got = self.reader.read_located(self.reader.locate(todo), ["length", "hidden", "scale"])
            for k, n, h, s in zip(*(got.column(c).to_pylist() for c in ("key", "length", "hidden", "scale"))):
                out[k] = self.rows[k] = (n, h, s)
            while len(self.rows) > self.lru_rows:
                self.rows.popitem(last=False)
        return self.reader.spec.codec, [out.get(k) for k in keys]


@serve.deployment(name="Upper")
class Upper:
    """The served models' upper layers and heads (and the lower layers, for misses), on a GPU where the replica has one.
    A request's documents arrive in one call and run in dynamic batches of documents from several requests: one
    Lookup call and one pass per model per batch."""

    def __init__(self, model_dirs: list[str], spec: dict, lookup, max_batch_size: int, batch_wait_timeout_s: float,
                 recycle: bool = True):
        import torch

        from er_core.predict import MultiTaskPredictor
        from er_core.store import CacheSpec

        self.spec = CacheSpec.from_dict(spec)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.p = MultiTaskPredictor(model_dirs, self.spec, device=self.device)
        self.lookup = lookup if recycle and self.p.uses_cache else None
        self.kinds = {name: meta["task"]["kind"] for name, (meta, _, _) in self.p.tasks.items()}
        self.layers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="er-layers")  # one batch's layers at a time
        self.run.set_max_batch_size(max_batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def models(self) -> dict:
        return {name: {"kind": kind, "method": self.p.tasks[name][0]["method"]} for name, kind in self.kinds.items()}

    def _too_long(self, doc: dict) -> str | None:
        """Texts longer than the model takes are refused (QA contexts are read in windows, so they may be long)."""
        inp = doc["input"]
        limit = self.spec.tokenizer.max_length
        if doc["form"] == "question":  # the question must leave room for a window of its context
            if len(inp["text"].encode()) + 4 < limit:  # every token covers a byte at least (specials aside)
                return None
            from er_core.embed import question_room  # the rule er's QA windows follow

            ok = question_room(self.p.tokenizer, inp["text"], limit) > 0
            return None if ok else f"the question leaves no room for its context within {limit} tokens"
        parts = inp["words"] if "words" in inp else [inp["text"], inp.get("text_pair") or ""]
        if sum(len(x.encode()) for x in parts) + 4 <= limit:  # every token covers a byte at least (specials aside)
            return None
        kw = {"is_split_into_words": True} if "words" in inp else {}
        text = inp["words"] if "words" in inp else inp["text"]
        n = len(self.p.tokenizer(text, inp.get("text_pair"), **kw)["input_ids"])
        return None if n <= limit else f"{n} tokens; the model takes at most {limit}"

    # Two batches at once, their layers run one at a time in one thread: the next batch's Lookup call overlaps this one's
    # layers, so the replica's core never idles waiting for rows.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=2,
                 batch_size_fn=lambda calls: sum(len(c) for c in calls))
    async def run(self, calls: list[list[dict]]) -> list[list[dict]]:
        """Each call is a request's documents (up to a batch of them): one handle call per request, not per document,
        and batches counted in documents."""
        docs = [d for c in calls for d in c]
        out = iter(await self._documents(docs))
        return [[next(out) for _ in c] for c in calls]

    async def _documents(self, docs: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        if self.lookup is not None:
            rows = await self.lookup.get.remote([d["key"] for d in docs])
        else:
            rows = (self.spec.codec, [None] * len(docs))
        t_lookup = time.perf_counter() - t0
        out = await asyncio.get_running_loop().run_in_executor(self.layers, self._predict, docs, rows)
        took = time.perf_counter() - t0
        for o in out:
            o["timing_ms"] = {"lookup": round(1000 * t_lookup, 3), "batch": round(1000 * took, 3), "batch_size": len(docs)}
        return out

    def _predict(self, docs: list[dict], rows: tuple[str, list]) -> list[dict]:
        states = decode_rows(rows, self.spec.hidden_size)
        out = [{"cached": s is not None} for s in states]
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(docs):
            reason = d.get("error") or (None if d["form"] == "id" else self._too_long(d))
            if d["form"] == "id" and states[i] is None:
                reason = f"id {d['id']!r} is not in the cache"
            if reason:
                out[i]["error"] = reason
                continue
            tasks = tuple(n for n, k in self.kinds.items() if d["form"] in INPUT_FORMS[k])
            groups.setdefault((d["form"], tasks), []).append(i)
        for (form, tasks), idx in groups.items():
            if form == "id":  # a cache keyed by id holds no text: classification from the states alone
                preds = self._by_states([states[i] for i in idx], [t for t in tasks if self.kinds[t] == "classification"])
            else:
                preds = self.p.predict([_example(docs[i], i) for i in idx], [states[i] for i in idx], list(tasks), detail=True)
            for i, p in zip(idx, preds):
                out[i]["predictions"] = p
        return out

    def _by_states(self, states: list[np.ndarray], tasks: list[str]) -> list[dict]:
        import torch

        from er_core.evaluate import forward
        from er_core.predict import described
        from er_core.task_data import collate

        out = [{} for _ in states]
        with torch.inference_mode():
            for name in tasks:
                meta, model, labels = self.p.tasks[name]
                ids = [np.zeros(len(s), np.int64) for s in states]  # the ids only set the mask's length here
                logits = forward(model, collate("classification", ids, None, states, self.p.pad_id)).float().cpu().numpy()
                for o, row in zip(out, logits):
                    o[name] = described("classification", None, row, labels.decode(int(row.argmax())))
        return out


@serve.deployment(name="MissLog", num_replicas=1)
class MissLog:
    """Inputs the cache lacked, written as JSONL files under `url` (one file per flush: object storage has no append),
    each row {"text": <the input as er keys it>}, which `er ingest URL --cache CACHE` reads as a corpus."""

    def __init__(self, url: str, storage_options: dict | None, flush_rows: int, flush_s: float):
        from er_core.store import url_to_fs

        self.url, self.flush_rows, self.flush_s = url.rstrip("/"), flush_rows, flush_s
        self.fs, self.path = url_to_fs(self.url, storage_options)
        self.pending: dict[str, dict] = {}
        self.written = 0
        self.task = None

    async def record(self, rows: list[tuple[str, dict]]) -> None:
        for key, inp in rows:
            self.pending.setdefault(key, inp)
        if len(self.pending) >= self.flush_rows:
            self.flush()
        elif self.task is None:
            self.task = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> int:
        """Write what is pending now; returns the rows written in all."""
        from er_core.store import put_atomic

        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.pending:
            rows, self.pending = self.pending, {}
            self.fs.makedirs(self.path, exist_ok=True)
            name = f"{self.path}/misses-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl"
            put_atomic(self.fs, name, "".join(json.dumps({"text": v}, ensure_ascii=False) + "\n" for v in rows.values()).encode())
            self.written += len(rows)
        return self.written


api = FastAPI(title="er serve", description="Recycled inference: cached documents run the upper layers only.")


@serve.deployment(name="Api")
@serve.ingress(api)
class Api:
    """HTTP JSON in front of Upper: checks the token and the request, answers each document from every model that
    takes its form, and sends the misses to the miss log."""

    def __init__(self, upper, misses, spec: dict, token_sha256: str | None, max_documents: int, max_batch_size: int):
        from er_core.store import CacheSpec

        self.upper, self.misses, self.max_documents, self.batch = upper, misses, max_documents, max_batch_size
        self.settings = CacheSpec.from_dict(spec).tokenizer
        self.token = bytes.fromhex(token_sha256) if token_sha256 else None

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        given = got[7:] if got.lower().startswith("bearer ") else ""
        # compared as digests, in constant time: the token itself never reaches this process
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), self.token):
            raise BadRequest("missing or wrong bearer token (Authorization: Bearer ...)", 401)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/models")
    async def models(self, request: Request):
        try:
            self._check_token(request)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return {"models": await self.upper.models.remote(), "forms": INPUT_FORMS}

    @api.post("/predict")
    async def predict(self, request: Request):
        try:
            self._check_token(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON: {str(e).splitlines()[0]}") from None
            return await self.answer(parse_documents(body, self.max_documents))
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # noqa: BLE001 - a replica that died mid-request, after one retry: a clear 503
            log.warning("request failed: %s", e)
            return JSONResponse({"error": f"the model replica failed ({type(e).__name__}); retry the request"}, status_code=503)

    async def answer(self, docs: list[dict]) -> dict:
        """What /predict answers for parsed documents; also the DeploymentHandle entry point (`handle.answer`)."""
        from er_core.keys import example_key

        for d in docs:
            d["key"] = d["id"] if d["form"] == "id" else example_key(d["input"], self.settings)
        parts = await asyncio.gather(*(self._call(chunk) for chunk in chunks(docs, self.batch)))
        results = [r for part in parts for r in part]
        missed = [(d["key"], d["input"]) for d, r in zip(docs, results) if not r["cached"] and d["form"] != "id" and "error" not in r]
        if missed and self.misses is not None:
            self.misses.record.remote(missed)  # not awaited: the answer does not wait for the log
        out = []
        for d, r in zip(docs, results):
            row = {"ref": d["ref"]} if d.get("ref") is not None else {}
            out.append({**row, **r})
        bad = [f"documents[{i}]: {r['error']}" for i, r in enumerate(results) if "error" in r]
        if bad and all("is not in the cache" not in b for b in bad):
            raise BadRequest("; ".join(bad), 422 if any("tokens" in b for b in bad) else 400)
        return {"documents": out}

    async def _call(self, docs: list[dict]) -> list[dict]:
        from ray.exceptions import RayActorError

        try:
            return await self.upper.run.remote(docs)
        except RayActorError:  # the replica died (or is unreachable): Serve routes the retry to a live one
            return await self.upper.run.remote(docs)


# ---------------------------------------------------------------- the application


def token_digest(token_env: str | None) -> str | None:
    """The sha256 of the token in environment variable `token_env` (the token itself goes nowhere)."""
    if not token_env:
        return None
    token = os.environ.get(token_env, "")
    if len(token) < 16:
        raise ErError(f"--token-env {token_env}: the variable is {'unset' if not token else 'shorter than 16 characters'}")
    return hashlib.sha256(token.encode()).hexdigest()


def check_models(cfg: ServeConfig) -> dict:
    """The cache's spec, after every model folder is checked against it: a mismatch refuses to start, in one line."""
    from er_core.artifacts import check_cache, read_meta
    from er_core.store import open_cache

    spec = open_cache(cfg.cache, storage_options=cfg.storage_options).spec
    for d in cfg.model_dir:
        check_cache(read_meta(d, cfg.storage_options), spec, d)
    return spec.to_dict()


def app(args: dict):
    """The application builder: ServeConfig fields in, a bound Serve application out (`serve deploy` calls it too)."""
    from er_core.secrets import reject_secrets

    cfg = (args if isinstance(args, ServeConfig) else ServeConfig(**args)).require()
    reject_secrets(cfg.storage_options)  # they would travel in the deployments' init args, shown by Serve's config
    spec = check_models(cfg)
    digest = cfg.token_sha256 or token_digest(cfg.token_env)
    gpus = cfg.gpus
    lookup = Lookup.options(num_replicas=1, ray_actor_options={"num_cpus": cfg.cpus_per_replica / 2}).bind(
        cfg.cache, cfg.storage_options, cfg.lru_rows, cfg.refresh_s)
    upper = Upper.options(
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            "target_ongoing_requests": cfg.target_ongoing_requests},
        max_ongoing_requests=max(cfg.max_batch_size * 2, cfg.target_ongoing_requests * 2),
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": gpus}).bind(
        list(cfg.model_dir), spec, lookup, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.recycle)
    misses = None if cfg.miss_log == "" else MissLog.options(ray_actor_options={"num_cpus": 0}).bind(
        cfg.miss_log_url(), cfg.storage_options, cfg.flush_rows, cfg.flush_s)
    return Api.options(ray_actor_options={"num_cpus": 0}).bind(upper, misses, spec, digest, cfg.max_documents, cfg.max_batch_size)


def serve_config(cfg: ServeConfig) -> dict:
    """A `serve deploy` config (also a RayService's serveConfigV2) running this application with these settings."""
    args = {k: v for k, v in cfg.to_dict().items() if k not in ("host", "port", "token_sha256") and v is not None}
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": cfg.name, "route_prefix": cfg.route_prefix, "import_path": "pipelines.serve:app",
                              "args": args}]}


def start(cfg: ServeConfig, blocking: bool = False):
    """Deploy on the Ray this process is connected to; returns the ingress's DeploymentHandle."""
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.token_env or cfg.token_sha256):
        raise ErError(f"--host {cfg.host} would listen beyond this machine without a token: give --token-env NAME")
    application = app(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(application, name=cfg.name, route_prefix=cfg.route_prefix, blocking=blocking)


def main(args) -> int:
    import yaml

    from pipelines.configs import serve_settings
    from pipelines.ray_env import ensure_ray

    cfg = serve_settings(args)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.print_serve_config:
        print(yaml.safe_dump(serve_config(cfg), sort_keys=False), end="")
        return 0
    check_models(cfg)  # before Ray starts: a mismatch is one line and costs nothing
    ensure_ray(args.address)
    start(cfg)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    print(f"er serve: {len(cfg.model_dir)} model(s) over {cfg.cache} at {url}/predict (POST {{\"documents\": [...]}}), "
          f"{url}/models; misses to {cfg.miss_log_url() or 'nowhere (miss_log off)'}"
          + ("" if args.detach else "; Ctrl-C stops it"), flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.name)
        print("er serve: stopped")
    return 0
