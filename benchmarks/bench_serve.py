"""Online recycled inference against the same model served whole, side by side in one run (`er serve`).

1. a corpus of --rows synthetic texts (--words words each) ingested at k = L/2 of the bundled MiniLM (fp16);
2. one classification model (`reduced`, a short training on a labelled slice of that corpus);
3. two Serve applications of that model, one after the other, with the same replicas and batching: `recycled`
   (er serve: cached states through the upper layers) and `full` (recycle off: every document through all layers);
4. per application: saturation throughput (an open-loop load offered above capacity), then p50/p99 latency under
   open-loop (Poisson) load at 50% and 80% of it; requests of --docs documents drawn at random from the cache
   (100% hits) or half from it and half new texts (50%);
5. the Lookup's share of the p50 latency, on local disk and (--s3) on the test S3 server with a smaller cache.

    python -m benchmarks.bench_serve [--rows 100000] [--docs 16] [--duration 20] [--s3] [--quick]
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .report import REPORT, write_section

HERE = Path(__file__).resolve().parent
VOCAB = ("the a of and to in is was with for on by that as at from this be are it an or not protein gene disease cell "
         "cells patients drug binds cancer mutation results study method we show background result effect level "
         "expression human receptor treatment increased reduced binding activity pathway tumor clinical trial dose "
         "response model data analysis sample group control").split()
LABELS = ("inhibitor", "activates")


def texts(n: int, words: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ws = [rnd.choice(VOCAB) for _ in range(words - 1)]
        ws.insert(rnd.randrange(words), LABELS[i % 2])
        out.append(f"{i} " + " ".join(ws))  # the number keeps every text distinct
    return out


def build(work: Path, rows: int, words: int, url: str | None = None) -> dict:
    """The cache (ingested, or kept from an earlier run in --work) and a model trained on a slice of it."""
    from er_core import Recycler, TrainConfig, finetune, ingest_local

    corpus = texts(rows, words, seed=0)
    cache = url or str(work / f"cache-{rows}-{words}")
    rec = Recycler.load("bundled", layer=3, codec="fp16")
    t0 = time.perf_counter()
    stats: dict = {}
    ingest_local(({"text": t} for t in corpus), cache, rec, progress=True, total=rows, stats=stats)
    ingest_s = time.perf_counter() - t0
    model = work / f"model-{words}"
    if not (model / "er_model.json").exists():
        task = work / "task"
        task.mkdir(exist_ok=True)
        for split, part in (("train", corpus[:512]), ("dev", corpus[512:640]), ("test", corpus[640:768])):
            (task / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": LABELS[int(t.split()[0]) % 2]}) + "\n"
                                                         for t in part))
        finetune(cache, str(task), str(model), TrainConfig(method="reduced", epochs=1), progress=False, log=lambda r: None)
    return {"cache": cache, "model": str(model), "corpus": corpus, "ingest_seconds": round(ingest_s, 1),
            "ingested": stats.get("claimed", 0)}


class Load:
    """Requests of `docs` documents: from the cache with probability `hits`, else new texts (misses)."""

    def __init__(self, corpus: list[str], docs: int, hits: float, words: int, seed: int = 1):
        self.corpus, self.docs, self.hits, self.words = corpus, docs, hits, words
        self.rnd, self.n = random.Random(seed), 0

    def body(self) -> bytes:
        docs = []
        for _ in range(self.docs):
            if self.rnd.random() < self.hits:
                docs.append({"text": self.rnd.choice(self.corpus)})
            else:
                self.n += 1
                ws = [self.rnd.choice(VOCAB) for _ in range(self.words)]
                docs.append({"text": f"new {self.n} {time.time_ns()} " + " ".join(ws)})
        return json.dumps({"documents": docs}).encode()


async def _closed_loop(url: str, load: Load, clients: int, duration: float) -> float:
    """Requests/s that `clients` senders, each waiting for its answer, complete: a first estimate of capacity."""
    import aiohttp

    done, stop = 0, time.perf_counter() + duration

    async def client(session):
        nonlocal done
        while time.perf_counter() < stop:
            async with session.post(url, data=load.body(), headers={"Content-Type": "application/json"}) as r:
                await r.read()
                done += r.status == 200

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return done / (time.perf_counter() - t0)


async def _open_loop(url: str, load: Load, rate: float, duration: float) -> dict:
    """Poisson arrivals at `rate` requests/s for `duration` s; every request's latency and the server's timings."""
    import aiohttp

    lat, lookup, fails = [], [], 0
    done_at = []
    rnd = random.Random(7)

    async def one(session, body):
        nonlocal fails
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                got = await r.json()
                if r.status != 200:
                    fails += 1
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            fails += 1
            return
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        done_at.append(t1)
        lookup.append(statistics.fmean(d["timing_ms"]["lookup"] for d in got["documents"]) / 1000)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks, start = [], time.perf_counter()
        t = start
        while t - start < duration:
            t += rnd.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, load.body())))
        await asyncio.gather(*tasks)
        end = time.perf_counter()
    inside = [x for x in done_at if x <= start + duration]
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None  # noqa: E731
    return {"offered_rps": rate, "sent": len(tasks), "ok": len(lat), "failed": fails,  # failed: an error or > 60 s
            "achieved_rps": len(inside) / duration, "drain_s": round(end - start - duration, 2),
            "p50_ms": q(0.5) and 1000 * q(0.5), "p99_ms": q(0.99) and 1000 * q(0.99),
            "lookup_share_p50": (statistics.median(lookup) / q(0.5)) if lat else None}


def measure(url: str, corpus: list[str], docs: int, hits: float, words: int, duration: float, log=print) -> dict:
    """Saturation (offered load well above what a short probe reached), then 50% and 80% of it."""
    load = Load(corpus, docs, hits, words)
    asyncio.run(_open_loop(url, load, 5.0, 3.0))  # warm-up: replicas, connections, first batches
    probe = asyncio.run(_closed_loop(url, load, 8, min(10.0, duration / 2)))  # enough in flight to fill the batches
    sat = asyncio.run(_open_loop(url, load, 1.25 * probe, duration))  # offered above capacity: what completes is it
    capacity = max(probe, sat["achieved_rps"])
    log(f"  saturation: {capacity * docs:.0f} docs/s ({capacity:.1f} requests/s of {docs} documents)")
    out = {"saturation_rps": capacity, "saturation_docs_per_s": capacity * docs, "saturation_run": sat, "at": {}}
    for frac in (0.5, 0.8):
        r = asyncio.run(_open_loop(url, load, frac * capacity, duration))
        out["at"][str(frac)] = r
        log(f"  at {int(100 * frac)}%: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, lookup share of p50 "
            f"{r['lookup_share_p50'] or 0:.1%} ({r['ok']} ok, {r['failed']} failed)")
    return out


def deploy(cache: str, model: str, recycle: bool, port: int, storage_options=None, batch: int = 32):
    from ray import serve

    from pipelines.configs import ServeConfig
    from pipelines.serve import start

    serve.shutdown()
    cfg = ServeConfig(cache=cache, model_dir=[model], port=port, recycle=recycle, miss_log="", max_batch_size=batch,
                      storage_options=storage_options, max_documents=256)
    start(cfg)
    return f"http://127.0.0.1:{port}/er/predict"


def run(rows: int, words: int, docs: int, duration: float, s3: bool, work: Path, s3_rows: int, log=print) -> dict:
    import ray

    from pipelines.ray_env import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    b = build(work, rows, words)
    log(f"cache of {rows} rows ready ({b['ingested']} ingested in {b['ingest_seconds']} s)")
    ensure_ray("local")
    port = 8300
    res = {"rows": rows, "words": words, "docs_per_request": docs, "duration_s": duration, "cpus": os.cpu_count(),
           "gpus": ray.cluster_resources().get("GPU", 0), "ingest": {k: b[k] for k in ("ingest_seconds", "ingested")},
           "when": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    for name, recycle, hits in (("recycled", True, 1.0), ("full", False, 1.0), ("recycled", True, 0.5)):
        log(f"{name}, {int(100 * hits)}% hits:")
        url = deploy(b["cache"], b["model"], recycle, port)
        res["runs"][f"{name}@{hits}"] = measure(url, b["corpus"], docs, hits, words, duration, log)
    if s3:
        from tests.s3_server import SeaweedS3

        server = SeaweedS3(work / "seaweedfs").start()
        try:
            os.environ.update(server.env())
            ray.shutdown()  # the replicas need the S3 variables: a Ray started after they were set
            ensure_ray("local")
            url = f"s3://{server.bucket}/cache"
            small = build(work, s3_rows, words, url=url)
            log(f"S3: cache of {s3_rows} rows at {url}")
            endpoint = deploy(url, b["model"], True, port)  # the replicas find the server and its keys in the environment
            sat = res["runs"]["recycled@1.0"]["saturation_rps"]
            load = Load(small["corpus"], docs, 1.0, words)
            asyncio.run(_open_loop(endpoint, load, 5.0, 3.0))
            res["s3"] = {"rows": s3_rows, **asyncio.run(_open_loop(endpoint, load, 0.5 * sat, duration))}
            log(f"  S3 at 50% of local saturation: p50 {res['s3']['p50_ms']:.1f} ms, lookup share "
                f"{res['s3']['lookup_share_p50']:.1%}")
        finally:
            from ray import serve

            serve.shutdown()
            server.stop()
    from ray import serve

    serve.shutdown()
    return res


def report(res: dict) -> str:
    r, f, h = res["runs"]["recycled@1.0"], res["runs"]["full@1.0"], res["runs"]["recycled@0.5"]
    ratio = r["saturation_docs_per_s"] / f["saturation_docs_per_s"]
    p99 = {k: (r["at"][k]["p99_ms"], f["at"][k]["p99_ms"]) for k in ("0.5", "0.8")}
    lines = ["## Online serving (`python -m benchmarks.bench_serve`)", "",
             f"Measured {res['when']} on this machine ({res['cpus']} cores, {int(res['gpus'])} GPUs), one Ray, the "
             f"applications deployed one after the other with the same settings (1 Upper replica, dynamic batches of up "
             f"to 32 documents, 5 ms wait). Cache: {res['rows']:,} synthetic texts of {res['words']} words at k=3 of the "
             f"bundled MiniLM (fp16); a `reduced` classification model trained on a slice. Requests of "
             f"{res['docs_per_request']} documents drawn at random, sent open loop (Poisson) from the same machine for "
             f"{res['duration_s']:.0f} s per point; saturation: the load completed while more was offered.", "",
             "| application | hits | saturation docs/s | p50 / p99 ms at 50% | p50 / p99 ms at 80% | Lookup share of p50 (50% load) |",
             "|---|---|---|---|---|---|"]
    for name, m in (("recycled", r), ("full", f), ("recycled", h)):
        hits = "100%" if m is not h else "50%"
        a, b = m["at"]["0.5"], m["at"]["0.8"]
        share = "" if m is f else f"{a['lookup_share_p50']:.1%}"
        lines.append(f"| {name} | {hits} | {m['saturation_docs_per_s']:.0f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
                     f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {share} |")
    lines += ["", f"At 100% hits recycled serving reached **{ratio:.2f}x** the documents/s of serving the model whole "
              f"(goal >= 1.7x at equal or lower p99). p99 at the same fraction of each one's saturation: "
              + "; ".join(f"{int(100 * float(k))}%: {a:.1f} ms recycled vs {b:.1f} ms full" for k, (a, b) in p99.items())
              + f". At 50% hits: {h['saturation_docs_per_s']:.0f} docs/s ({h['saturation_docs_per_s'] / f['saturation_docs_per_s']:.2f}x full)."]
    if "s3" in res:
        s = res["s3"]
        lines += ["", f"S3 (SeaweedFS on 127.0.0.1, a cache of {s['rows']:,} rows), recycled at 100% hits, offered 50% of the "
                  f"local saturation: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, the Lookup's share of p50 "
                  f"{s['lookup_share_p50']:.1%}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="cache rows (synthetic texts)")
    ap.add_argument("--words", type=int, default=48, help="words per text")
    ap.add_argument("--docs", type=int, default=16, help="documents per request")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load point")
    ap.add_argument("--s3", action="store_true", help="also the Lookup's share on the test S3 server")
    ap.add_argument("--s3-rows", type=int, default=10_000, help="rows of the S3 cache")
    ap.add_argument("--work", type=Path, help="keep the cache and model here (a rerun reuses them)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2,000 rows, 3 s per point")
    ap.add_argument("--out", type=Path, default=REPORT)
    a = ap.parse_args(argv)
    rows, duration = (2000, 3.0) if a.quick else (a.rows, a.duration)
    work = a.work or Path(tempfile.mkdtemp(prefix="er-serve-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = run(rows, a.words, a.docs, duration, a.s3, work, min(a.s3_rows, rows))
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    (a.out.parent / "results").mkdir(exist_ok=True)
    (a.out.parent / "results" / ("serve-quick.json" if a.quick else "serve.json")).write_text(json.dumps(res, indent=1))
    text = report(res)
    if not a.quick:
        write_section("serve", text, a.out)
    print(text)


if __name__ == "__main__":
    main()
