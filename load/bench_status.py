"""What the ingress's reading of the models' replicas costs, against serve.status().

    python -m load.bench_status [--models 1 6] [--reads 40]

Each ingress replica reads every model deployment's state once a second (serve.replicas).
For each count of tiny CPU models this starts the app on a local Ray and times `--reads`
reads both ways: as the ingress reads them (model_deployments: the controller's details,
counted as they come) and through serve.status() (the same details, validated into
Serve's schema first). Each way reports the median wall time and this process's CPU time
per read. Before timing, it stops with an error unless both ways give every deployment the
same status, message and replicas taking requests, one each. Prints a table and saves JSON
(default results/status-cpu-tiny.json). Figures are what this run saw.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

from load.report import save_report
from serve.config import default_cache_dir

APP = "atelier-status"


def timed(read: Callable[[], object], reads: int) -> dict:
    """Median wall and CPU milliseconds of `reads` calls of `read`."""
    wall, cpu = [], []
    for _ in range(reads):
        w, c = time.perf_counter(), time.process_time()
        read()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        time.sleep(0.02)
    return {"wall_ms": round(statistics.median(wall) * 1000, 2),
            "cpu_ms": round(statistics.median(cpu) * 1000, 2)}


def measure(models: int, reads: int, cache_dir: str) -> dict:
    from ray import serve

    from serve.app import build_app
    from serve.replicas import SERVING, model_deployments

    config = {"cache_dir": cache_dir, "models": [
        {"id": f"atelier/tiny-{i}", "embedded": "tiny-sdxl", "dtype": "float32",
         "num_cpus": 0.1, "batching": {"max_batch_size": 1, "wait_ms": 0}}
        for i in range(models)]}
    serve.run(build_app({"atelier": config}), name=APP, route_prefix=f"/{APP}")
    try:
        status = serve.status().applications[APP].deployments
        names = {n: n for n in status}
        ours = {n: (s.status, s.message, s.running) if s else None
                for n, s in model_deployments(names, APP).items()}
        theirs = {n: (d.status, d.message, sum(d.replica_states.get(state, 0)
                                               for state in SERVING))
                  for n, d in status.items()}
        if ours != theirs or any(running != 1 for _, _, running in theirs.values()):
            raise RuntimeError(f"the ingress's read {ours} differs from serve.status() "
                               f"{theirs}, or a deployment runs other than one replica")
        return {"models": models, "deployments": len(names),
                "ingress_read": timed(lambda: model_deployments(names, APP), reads),
                "serve_status": timed(serve.status, reads)}
    finally:
        serve.delete(APP)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--reads", type=int, default=40)
    parser.add_argument("--cache-dir", help="model cache (default: ATELIER_CACHE_DIR or "
                        "~/.cache/atelier)")
    parser.add_argument("--out", help="JSON path (default results/status-cpu-tiny.json)")
    args = parser.parse_args(argv)
    import ray

    ray.init(address="local", num_cpus=max(args.models) + 2, include_dashboard=False)
    try:
        cache_dir = args.cache_dir or str(default_cache_dir())
        rows = [measure(n, args.reads, cache_dir) for n in args.models]
    finally:
        ray.shutdown()
    print("models  deployments  ingress read (wall / CPU ms)  serve.status() (wall / CPU ms)")
    for row in rows:
        ours, theirs = row["ingress_read"], row["serve_status"]
        print(f"{row['models']:6d}  {row['deployments']:11d}  {ours['wall_ms']:12.1f} / "
              f"{ours['cpu_ms']:<12.1f}  {theirs['wall_ms']:12.1f} / {theirs['cpu_ms']:.1f}")
    report = {"benchmark": "status", "reads": args.reads, "rows": rows,
              "ray": ray.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine()}
    save_report(report, args.out, "status-cpu-tiny")
    return report


if __name__ == "__main__":
    main()
