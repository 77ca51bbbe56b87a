"""What watching its unfinished predictions for cancel requests costs an ingress replica.

    python -m load.bench_cancels [--counts 100 1000] [--seconds 5] [--redis-url URL]

Each unfinished prediction waits on `PredictionRunner.until_canceled`, which must notice
a cancel recorded through any replica. For each count and store (the replica's memory,
and Redis: the given URL, else a `redis-server` started on a free port when one is on
PATH), this watches that many predictions for `--seconds`, reports the share of a core
this process used meanwhile, then records a cancel for one of them and reports how long
it took to be noticed (at most 60 s). Prints a table and saves JSON (default
results/cancels-cpu.json). Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import socket
import subprocess
import tempfile
import time

from load.report import save_report
from serve.predictions import PredictionRunner
from serve.redis_state import RedisStore
from serve.state import MemoryStore


async def watch(store, count: int, seconds: float) -> dict:
    runner = PredictionRunner(store, "bench", None)
    ids = [f"bench-{i:06d}" for i in range(count)]
    watches = [asyncio.ensure_future(runner.until_canceled(i)) for i in ids]
    try:
        await asyncio.sleep(1.0)  # every watch started
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        share = (time.process_time() - cpu) / (time.perf_counter() - wall)
        started = time.perf_counter()
        await store.request_cancel(ids[count // 2])
        done, _ = await asyncio.wait([watches[count // 2]], timeout=60)
        noticed = time.perf_counter() - started if done else None
    finally:
        for w in watches:
            w.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
    return {"predictions": count, "core_share": round(share, 3),
            "cancel_noticed_ms": None if noticed is None else round(noticed * 1000, 1)}


def _local_redis() -> tuple[str, subprocess.Popen] | None:
    if shutil.which("redis-server") is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", tempfile.mkdtemp()],
                              stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}/0", server


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--redis-url", help="default: a redis-server started here")
    parser.add_argument("--out", help="JSON path (default results/cancels-cpu.json)")
    args = parser.parse_args(argv)
    started = None if args.redis_url else _local_redis()
    url = args.redis_url or (started[0] if started else None)
    rows = []
    try:
        for count in args.counts:
            rows.append({"store": "memory", **asyncio.run(
                watch(MemoryStore(3600, 2**20), count, args.seconds))})
            if url:
                rows.append({"store": "redis", **asyncio.run(
                    watch(RedisStore(url, 3600), count, args.seconds))})
    finally:
        if started:
            started[1].terminate()
    print(f"{'store':8} {'predictions':>11} {'core share':>10} {'cancel seen':>12}")
    for r in rows:
        seen = "-" if r["cancel_noticed_ms"] is None else f"{r['cancel_noticed_ms']} ms"
        print(f"{r['store']:8} {r['predictions']:>11} {r['core_share']:>10.0%} {seen:>12}")
    report = {"machine": platform.processor() or platform.machine(),
              "seconds": args.seconds, "rows": rows}
    save_report(report, args.out, "cancels-cpu")
    return report


if __name__ == "__main__":
    main()
