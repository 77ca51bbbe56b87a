"""Two Ray nodes on this machine, each declaring two GPUs, serving one model with four
replicas: one replica per (node, GPU), traffic on all four, the survivors serving while a
node is down, and placement restored when a node comes back.

The GPUs are Ray resources only (the replicas compute on CPU); Ray still gives each
replica its own GPU id, which is what placement is about. Runs before tests/integration
starts its own cluster (pytest collects folders in name order).
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import _free_port

RAY = str(Path(sys.executable).parent / "ray")
MODEL = "atelier/tiny-sdxl"


def _ray_start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=4",
                             "--num-gpus=2", f"--dashboard-agent-listen-port={_free_port()}",
                             f"--metrics-export-port={_free_port()}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(*nodes: subprocess.Popen) -> None:
    """SIGTERM to each node, then wait for them all: each drains for up to 30 s."""
    running = [node for node in nodes if node.poll() is None]
    for node in running:
        os.killpg(node.pid, signal.SIGTERM)
    for node in running:
        node.wait(90)


def _until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(cache_dir):
    """(ray module, serve url, GCS address, {name: node process}) of a two-node cluster."""
    # Token auth off for this throwaway cluster: this driver process may have loaded Ray's
    # config (auth mode included) before the test, when other test modules imported ray.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    gcs = f"127.0.0.1:{_free_port()}"
    nodes = {"head": _ray_start("--head", f"--port={gcs.split(':')[1]}",
                                "--include-dashboard=false")}
    import ray
    from ray import serve

    try:
        _until(lambda: _can_connect(gcs), 60, "the head node")
        nodes["worker"] = _ray_start(f"--address={gcs}")
        ray.init(address=gcs)
        _until(lambda: _alive_nodes(ray) == 2, 60, "two alive nodes")
        url = _deploy(serve, cache_dir)
        yield ray, url, gcs, nodes
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        _stop(*nodes.values())
        os.environ.pop("RAY_AUTH_MODE", None)


def _can_connect(address: str) -> bool:
    host, port = address.split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _alive_nodes(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def _deploy(serve, cache_dir) -> str:
    from serve.app import build_app

    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"atelier": {"cache_dir": str(cache_dir), "models": [{
        "id": MODEL, "embedded": "tiny-sdxl", "dtype": "float32", "replicas": 4,
        "num_cpus": 1, "batching": {"max_batch_size": 1, "wait_ms": 0},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 2}}]}}),
        name="atelier", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _traffic(url: str, n: int) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/generate", json={"prompt": "x",
                                                                          "seed": s})
                                          for s in range(n)], return_exceptions=True)

    return asyncio.run(run())


def _placements(url: str, n: int = 24) -> dict[str, tuple[str, str]]:
    """replica -> (node id, GPU id) for the replicas that answered n concurrent requests;
    empty if any request failed."""
    responses = _traffic(url, n)
    if not all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses):
        return {}
    return {r.headers["x-atelier-replica"]: (r.headers["x-atelier-node"],
                                             r.headers["x-atelier-gpu"]) for r in responses}


def _one_replica_per_gpu_of_two_nodes(url: str) -> dict | None:
    seen = _placements(url)
    pairs = set(seen.values())
    if len(seen) == 4 and len(pairs) == 4 and len({node for node, _ in pairs}) == 2:
        return seen
    return None


def test_four_replicas_on_distinct_gpus_of_both_nodes_all_get_traffic(cluster):
    ray, url, _, _ = cluster
    seen = _until(lambda: _one_replica_per_gpu_of_two_nodes(url), 120, "four placements")
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert {node for node, _ in seen.values()} == alive
    for node in alive:
        assert sorted(gpu for n, gpu in seen.values() if n == node) == ["0", "1"]


def test_a_stopped_node_leaves_the_other_serving_and_placement_returns_with_it(cluster):
    ray, url, gcs, nodes = cluster
    _until(lambda: _one_replica_per_gpu_of_two_nodes(url), 120, "four placements")
    head_node = ray.get_runtime_context().get_node_id()

    _stop(nodes["worker"])
    _until(lambda: _alive_nodes(ray) == 1, 60, "the worker node to be gone")
    survivors = _until(lambda: _placements(url, 12), 120, "the head's replicas to serve")
    assert {node for node, _ in survivors.values()} == {head_node}
    assert sorted({gpu for _, gpu in survivors.values()}) == ["0", "1"]
    # The missing replicas wait for GPUs; /healthz says so.
    # Serve finds the lost replicas by their failed health checks; /healthz then says the
    # model runs two of its four replicas. (Serve may drop the lost replicas from its count
    # a moment before its status turns: the wait is for both.)
    health = _until(lambda: (h := httpx.get(f"{url}/healthz").json()["models"][MODEL])[
        "replicas_running"] == 2 and h["status"] != "HEALTHY" and h, 60,
        "the lost replicas to be noticed")
    assert (health["replicas_wanted"], health["state"], health["status"]) == (
        4, "not_ready", "UNHEALTHY"), health
    assert "health check failed" in health["message"]

    nodes["worker"] = _ray_start(f"--address={gcs}")
    seen = _until(lambda: _one_replica_per_gpu_of_two_nodes(url), 180, "placement restored")
    new_node = ({node for node, _ in seen.values()} - {head_node}).pop()
    assert sorted(gpu for n, gpu in seen.values() if n == new_node) == ["0", "1"]
