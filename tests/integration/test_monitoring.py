"""The Grafana dashboard, query by query, against a real Prometheus scraping the app.

Prometheus (Debian's package, installed by `make test`) runs with the shipped
`monitoring/prometheus.yml`, which finds Ray's metrics ports through the service-discovery
file Ray's dashboard writes; only the scrape interval is shortened. After traffic that
exercises every metric, each panel query must return at least one finite value; on a
machine without a GPU, the panels of Ray's GPU node metrics (which Ray exports only from
nodes with GPUs) must be valid queries.
"""

import base64
import io
import json
import math
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from tests.conftest import asked_until
from tests.integration.conftest import (
    AUTH,
    AUTOSCALED,
    CHECKED,
    CHECKED_PROMPT,
    FAST,
    KONTEXT,
    TWO_REPLICAS,
    _free_port,
    ray_session_dir,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "atelier.json"
ALERTS = ROOT / "monitoring" / "alerts.yml"
RAY_SD_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")
RAY_GPU_METRICS = ("ray_node_gpus_utilization", "ray_node_gram_used")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def prometheus(base_url, metrics_port, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs Debian's prometheus"
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [str(RAY_SD_FILE)]
    # RAY_SD_FILE links to the newest Ray session's file; read this cluster's own, in case
    # another Ray session started on this machine meanwhile.
    ours = ray_session_dir() / RAY_SD_FILE.name
    targets = json.loads(ours.read_text())[0]["targets"]
    assert any(t.endswith(f":{metrics_port}") for t in targets), targets
    job["file_sd_configs"][0]["files"] = [str(ours)]
    # Ray's metrics agent takes up to a second to answer on a busy 2-core machine, and a
    # scrape that times out marks every series of its target stale (empty to a query until
    # the next good one): scrapes are short but not shorter than that.
    config["global"]["scrape_interval"] = "2s"
    config["global"]["scrape_timeout"] = "2s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ALERTS)]  # the shipped rules, from where they are
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_ready(url, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("prometheus did not become ready")


def _black_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BLACK_PNG = _black_png()


def _traffic(base_url, seconds):
    """Good requests (some with adapters, a ControlNet or an image prompt, some enlarged,
    some withheld by a safety checker, some Kontext edits), and bad ones, from two clients
    at once."""

    def client(offset):
        with httpx.Client(base_url=base_url, headers=AUTH, timeout=60) as c:
            end, i = time.monotonic() + seconds, offset
            while time.monotonic() < end:
                body = {"prompt": "a cat", "seed": i, "model": FAST}
                if i % 3 == 0:
                    body["loras"] = [{"name": "pixel-art"}]
                if i % 4 == 1:  # a ControlNet steers it (a black control image)
                    body["controlnets"] = [{"name": "lines", "image": BLACK_PNG}]
                if i % 5 == 2:  # an image prompt steers it
                    body["ip_adapter_image"] = BLACK_PNG
                if i % 7 == 3:  # enlarged by its first upscaler
                    body["upscale"] = 2
                assert c.post("/generate", json=body).status_code == 200
                if i % 6 == 0:  # a Kontext edit of a black reference
                    edit = {"prompt": "make it red", "model": KONTEXT, "image": BLACK_PNG}
                    assert c.post("/generate", json=edit).status_code == 200
                assert c.post("/generate", json={"prompt": "", "model": FAST}).status_code == 422
                if i % 8 == 0:
                    flagged = {"prompt": CHECKED_PROMPT, "seed": 10, "model": CHECKED}
                    r = c.post("/generate", json=flagged)
                    assert r.json()["nsfw_content_detected"] == [True], r.text
                i += 2

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _panel_queries():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row"
            for t in p["targets"]]


def _concrete(expr):
    """The panel's query for the traffic's models: SDXL's, and Kontext's edits."""
    return expr.replace("$model", f"{FAST}|{KONTEXT}").replace("$__rate_interval", "1m")


def _query(prometheus, expr):
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr})
    assert r.status_code == 200, (expr, r.text)
    return r.json()["data"]["result"]


def _scrapes(prometheus) -> dict:
    """Each target's last scrape, for a failure's message: up, and its seconds."""
    return {s["metric"]["instance"]: (kind, s["value"][1])
            for kind in ("up", "scrape_duration_seconds")
            for s in _query(prometheus, kind)}


def _empty_panels(prometheus) -> list:
    empty = []
    for title, expr in _panel_queries():
        values = [float(s["value"][1]) for s in _query(prometheus, _concrete(expr))]
        if title.startswith("Busy share"):  # a fraction of each replica's time
            assert values and all(0 < v <= 1.1 for v in values), values
        gpu_only = any(metric in expr for metric in RAY_GPU_METRICS)
        if not any(math.isfinite(v) for v in values) and (_has_gpu() or not gpu_only):
            empty.append((title, expr, values))
    return empty


def test_every_dashboard_panel_returns_data(base_url, prometheus):
    _traffic(base_url, seconds=30)
    time.sleep(5)  # one more scrape of the last export
    empty = asked_until(lambda: _empty_panels(prometheus), lambda empty: not empty)
    assert not empty, (empty, _scrapes(prometheus))
    assert sum(any(m in e for m in RAY_GPU_METRICS) for _, e in _panel_queries()) == 2


def test_the_dashboard_covers_what_operators_watch():
    titles = " ".join(title for title, _ in _panel_queries()).lower()
    for topic in ("per replica", "p95", "queue", "batch fill", "adapter hit", "prompts held",
                  "errors", "memory", "healthy", "store answers", "by api key", "busy share",
                  "gpu utilization", "garbage collection", "event-loop delay",
                  "safety checker", "controlnet",
                  "image prompt", "edits", "enlarged", "unfinished predictions", "refused (429)"):
        assert topic in titles, topic


def test_usage_is_counted_under_the_api_keys_name(prometheus):
    """After the traffic above (made with API_KEY, which has no name of its own)."""
    import hashlib

    from tests.integration.conftest import API_KEY

    name = f"key-{hashlib.sha256(API_KEY.encode()).hexdigest()[:8]}"
    by_key = {s["metric"]["key"]: float(s["value"][1])
              for s in _query(prometheus, "sum by (key) (ray_atelier_key_images_total)")}
    assert by_key.get(name, 0) >= 10 and API_KEY not in by_key


def test_the_ingress_exports_each_models_running_and_wanted_replicas(base_url, prometheus):
    """Each model of the app runs what it should: one replica, two for the two-replica
    model, and the autoscaled one's fewest (one), as /healthz says too. (Other apps of the
    session export their own models' counts.)"""
    health = httpx.get(f"{base_url}/healthz", headers=AUTH).json()["models"]
    expected = {model: (h["replicas_running"], h["replicas_range"][0])
                for model, h in health.items()}
    assert expected[TWO_REPLICAS] == (2, 2) and expected[AUTOSCALED][1] == 1

    def exported():
        counts = {}
        for kind in ("running", "wanted"):
            for s in _query(prometheus, "max by (model) (ray_atelier_model_replicas_"
                                        f'{kind}{{application="atelier"}})'):
                counts.setdefault(s["metric"]["model"], {})[kind] = float(s["value"][1])
        return {model: (c.get("running"), c.get("wanted")) for model, c in counts.items()}

    pairs = asked_until(exported, lambda pairs: pairs == expected)
    assert pairs == expected, (pairs, _scrapes(prometheus))


def _read_by_rules() -> dict[str, set[str]]:
    """Each metric the shipped rules read, with the series matchers a rule reads it with
    (`{component="replica"}`, say), and the labels those rules group it by."""
    read: dict[str, set[str]] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", rule["expr"])
                       for label in by.split(",")}
            for metric in re.findall(r"\b(ray_[a-z_]+(?:\{[^}]*\})?)", rule["expr"]):
                read.setdefault(metric, set()).update(grouped)
    return read


def test_every_alert_rule_runs_on_the_metrics_the_app_exports(prometheus):
    """After the traffic above: Prometheus evaluated every shipped rule (alerts and the
    recording rules they read) without error,
    and each metric the rules read exists with the labels they group by (those of Ray's
    GPU node metrics only where there is a GPU). `tests/unit/test_alerts.py` checks when
    each alert fires."""
    shipped = {rule.get("alert") or rule["record"]
               for group in yaml.safe_load(ALERTS.read_text())["groups"]
               for rule in group["rules"]}

    def loaded():
        groups = httpx.get(f"{prometheus}/api/v1/rules").json()["data"]["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    rules = asked_until(loaded, lambda rules: rules and all(
        r["health"] != "unknown" for r in rules.values()))
    assert set(rules) == shipped
    assert {name: (r["health"], r.get("lastError", "")) for name, r in rules.items()} == {
        name: ("ok", "") for name in shipped}
    for metric, grouped in sorted(_read_by_rules().items()):
        if metric.startswith("ray_node_") and not _has_gpu():  # GPU nodes export these
            continue
        name = metric.split("{")[0]  # exported, if not yet with the values a rule picks
        series = asked_until(lambda m=name: [s["metric"] for s in _query(prometheus, m)], bool)
        assert series, (metric, _scrapes(prometheus))
        picked = [s["metric"] for s in _query(prometheus, metric)] if "{" in metric else series
        assert all(grouped <= set(labels) for labels in picked), (metric, grouped, picked)
    deployments = {s["metric"]["deployment"] for s in
                   _query(prometheus, "ray_serve_deployment_replica_healthy")}
    assert "Ingress" in deployments and any(d.startswith("model-") for d in deployments)
