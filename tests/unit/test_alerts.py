"""The shipped alerting rules (monitoring/alerts.yml), evaluated by Prometheus's own rule
tester (`promtool test rules`) over series shaped as Ray exports Atelier's and Serve's
metrics: each alert fires where it should, with its labels and rendered annotations, and
stays silent beside it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "alerts.yml"


def _rules() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]
            if "alert" in rule}


def _expected(alert: str, labels: dict[str, str]) -> dict:
    """An alert as promtool reports it: the rule's labels beside the series', and its
    annotations with `{{ $labels.x }}` filled in."""
    rule = _rules()[alert]
    annotations = {name: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], text)
                   for name, text in rule["annotations"].items()}
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}


def _healthy(deployment: str, replica: str, values: str) -> dict:
    return {"series": f'ray_serve_deployment_replica_healthy{{application="atelier",'
                      f'deployment="{deployment}",replica="{replica}"}}', "values": values}


def _ingress(metric: str, model: str, values: str, extra: str = "") -> dict:
    return {"series": f'{metric}{{application="atelier",deployment="Ingress",'
                      f'model="{model}"{extra}}}', "values": values}


def _buckets(metric: str, model: str, counts: dict[str, int]) -> list[dict]:
    """A histogram whose buckets each grow by `counts[le]` per sample."""
    return [_ingress(f"{metric}_bucket", model, f"0+{n}x80", f',le="{le}"')
            for le, n in counts.items()]


def _availability() -> dict:
    # acme-sdxl loses both replicas at 1 minute; acme-flux one of two; the deployment
    # status of acme-sdxl is 2 (unhealthy) from 1 minute, acme-flux's 3 (updating).
    return {"interval": "15s", "input_series": [
        _healthy("model-acme-sdxl", "a", "1x3 0x40"), _healthy("model-acme-sdxl", "b", "1x3 0x40"),
        _healthy("model-acme-flux", "c", "1x44"), _healthy("model-acme-flux", "d", "1x3 0x40"),
        _healthy("Ingress", "e", "1x44"),
        {"series": 'ray_serve_deployment_status{application="atelier",'
                   'deployment="model-acme-sdxl"}', "values": "6x3 2x40"},
        {"series": 'ray_serve_deployment_status{application="atelier",'
                   'deployment="model-acme-flux"}', "values": "6x3 3x40"}],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "AtelierModelDown", "exp_alerts": [_expected(
                "AtelierModelDown", {"application": "atelier",
                                     "deployment": "model-acme-sdxl"})]},
            {"eval_time": "3m", "alertname": "AtelierIngressDown", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "AtelierDeploymentUnhealthy", "exp_alerts": []},
            {"eval_time": "7m", "alertname": "AtelierDeploymentUnhealthy", "exp_alerts": [
                _expected("AtelierDeploymentUnhealthy", {
                    "application": "atelier", "deployment": "model-acme-sdxl"})]}]}


def _replicas() -> dict:
    # Two ingress replicas (e, f) read each model's replicas. acme/flux (two wanted) runs
    # one from 1 minute, as both read; acme/sdxl (one wanted) runs it, as ingress e reads,
    # while the stopped ingress f's last reading, a replica starting, stays exported.
    def gauge(kind: str, model: str, ingress: str, values: str) -> dict:
        return _ingress(f"ray_atelier_model_replicas_{kind}", model, values,
                        f',replica="{ingress}"')

    return {"interval": "1m", "input_series": [
        *(gauge("wanted", "acme/flux", ingress, "2x30") for ingress in "ef"),
        *(gauge("running", "acme/flux", ingress, "2 1x30") for ingress in "ef"),
        *(gauge("wanted", "acme/sdxl", ingress, "1x30") for ingress in "ef"),
        gauge("running", "acme/sdxl", "e", "1x30"), gauge("running", "acme/sdxl", "f", "0x30")],
        "alert_rule_test": [
            {"eval_time": "14m", "alertname": "AtelierReplicasMissing", "exp_alerts": []},
            {"eval_time": "17m", "alertname": "AtelierReplicasMissing", "exp_alerts": [
                _expected("AtelierReplicasMissing", {"model": "acme/flux"})]}]}


def _store() -> dict:
    # Ingress replica f of app atelier loses Redis at 1 minute (e still reaches it, as both
    # of app studio do).
    def gauge(app: str, replica: str, values: str) -> dict:
        return {"series": f'ray_atelier_store_available{{application="{app}",'
                          f'deployment="Ingress",replica="{replica}"}}', "values": values}

    return {"interval": "15s", "input_series": [
        gauge("atelier", "e", "1x44"), gauge("atelier", "f", "1x3 0x40"),
        gauge("studio", "g", "1x44"), gauge("studio", "h", "1x44")],
        "alert_rule_test": [
            {"eval_time": "90s", "alertname": "AtelierStoreUnavailable", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "AtelierStoreUnavailable", "exp_alerts": [
                _expected("AtelierStoreUnavailable", {"application": "atelier"})]}]}


def _requests() -> dict:
    # Per 15 s: acme/sdxl delivers 60 and fails 6 (9 %, oom) and is refused 3 times (4.8 %);
    # acme/flux delivers 60 and fails 1 (1.6 %); acme/broken delivers none and fails 3;
    # client errors (validation, model "unknown") count for nothing here.
    count = "ray_atelier_generation_duration_seconds_count"
    errors = "ray_atelier_errors_total"
    return {"interval": "15s", "input_series": [
        _ingress(count, "acme/sdxl", "0+60x80"), _ingress(count, "acme/flux", "0+60x80"),
        _ingress(errors, "acme/sdxl", "0+6x80", ',kind="oom"'),
        _ingress(errors, "acme/sdxl", "0+3x80", ',kind="overload"'),
        _ingress(errors, "acme/flux", "0+1x80", ',kind="failed"'),
        _ingress(errors, "acme/broken", "0+3x80", ',kind="replica_lost"'),
        _ingress(errors, "unknown", "0+500x80", ',kind="validation"')],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "AtelierGenerationsFailing", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "AtelierGenerationsFailing", "exp_alerts": [
                _expected("AtelierGenerationsFailing", {"model": "acme/sdxl"}),
                _expected("AtelierGenerationsFailing", {"model": "acme/broken"})]},
            {"eval_time": "12m", "alertname": "AtelierOverloaded", "exp_alerts": [
                _expected("AtelierOverloaded", {"model": "acme/sdxl"})]}]}


def _loop_delays(deployment: str, loop: str, counts: dict[str, int]) -> list[dict]:
    """Serve's event-loop histogram of one deployment's loop, as `_buckets` grows them."""
    labels = (f'application="atelier",deployment="{deployment}",component="replica",'
              f'loop_type="{loop}"')
    return [{"series": f'ray_serve_event_loop_scheduling_latency_ms_bucket{{{labels},'
                       f'le="{le}"}}', "values": f"0+{n}x80"} for le, n in counts.items()]


def _latency() -> dict:
    # acme/sdxl: 9 of 10 generations take 16-32 s (p99 about 30 s), and 9 of 10 requests
    # wait 4-16 s for a batch (p95 about 15 s); acme/flux: all within 8 s and 4 s. The
    # acme/sdxl replicas run ready work 1-2.5 s late half the time; acme/flux's within
    # 10 ms on their own loop, and late on Serve's main loop, which the alert leaves out.
    generation, wait = "ray_atelier_generation_duration_seconds", "ray_atelier_queue_wait_seconds"
    series = [*_buckets(generation, "acme/sdxl", {"8": 0, "16": 1, "32": 10, "+Inf": 10}),
              *_buckets(generation, "acme/flux", {"8": 10, "16": 10, "32": 10, "+Inf": 10}),
              *_buckets(wait, "acme/sdxl", {"4": 1, "16": 10, "+Inf": 10}),
              *_buckets(wait, "acme/flux", {"4": 10, "16": 10, "+Inf": 10}),
              *_loop_delays("model-acme-sdxl", "user_code",
                            {"10": 5, "1000": 5, "2500": 10, "+Inf": 10}),
              *_loop_delays("model-acme-flux", "user_code",
                            {"10": 10, "1000": 10, "2500": 10, "+Inf": 10}),
              *_loop_delays("model-acme-flux", "main",
                            {"10": 0, "1000": 0, "2500": 10, "+Inf": 10})]
    return {"interval": "15s", "input_series": series, "alert_rule_test": [
        {"eval_time": "8m", "alertname": "AtelierSlowGenerations", "exp_alerts": []},
        {"eval_time": "15m", "alertname": "AtelierSlowGenerations", "exp_alerts": [
            _expected("AtelierSlowGenerations", {"model": "acme/sdxl"})]},
        {"eval_time": "15m", "alertname": "AtelierQueueWaitLong", "exp_alerts": [
            _expected("AtelierQueueWaitLong", {"model": "acme/sdxl"})]},
        {"eval_time": "12m", "alertname": "AtelierEventLoopBlocked", "exp_alerts": []},
        {"eval_time": "19m", "alertname": "AtelierEventLoopBlocked", "exp_alerts": [
            _expected("AtelierEventLoopBlocked", {"application": "atelier",
                                                  "deployment": "model-acme-sdxl"})]}]}


def _gpus() -> dict:
    def gram(kind: str, gpu: str, values: str) -> dict:
        return {"series": f'ray_node_gram_{kind}{{ip="10.0.0.1",GpuIndex="{gpu}"}}',
                "values": values}

    # GPU 0 at 97 % of its memory, GPU 1 at 51 %.
    return {"interval": "1m", "input_series": [
        gram("used", "0", "95000x20"), gram("available", "0", "3000x20"),
        gram("used", "1", "50000x20"), gram("available", "1", "48000x20")],
        "alert_rule_test": [{"eval_time": "15m", "alertname": "AtelierGpuMemoryNearlyFull",
                             "exp_alerts": [_expected("AtelierGpuMemoryNearlyFull", {
                                 "ip": "10.0.0.1", "GpuIndex": "0"})]}]}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make test` installs Debian's prometheus"
    return subprocess.run([binary, *args], check=False, capture_output=True, text=True,
                          timeout=60)


def _test_rules(tests: list[dict], folder: Path) -> subprocess.CompletedProcess:
    spec = folder / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "15s",
                                    "tests": tests}))
    return _promtool("test", "rules", str(spec))


@pytest.mark.parametrize("case", [_availability, _replicas, _store, _requests, _latency, _gpus])
def test_each_alert_fires_where_it_should_and_only_there(case, tmp_path):
    run = _test_rules([case()], tmp_path)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_shipped_alert_is_tested_and_a_wrong_expectation_fails(tmp_path):
    tested = {t["alertname"] for case in (_availability, _replicas, _store, _requests, _latency, _gpus)
              for t in case()["alert_rule_test"]}
    assert tested == set(_rules())
    wrong = _requests()
    wrong["alert_rule_test"][2]["exp_alerts"].append(
        _expected("AtelierOverloaded", {"model": "acme/flux"}))
    run = _test_rules([wrong], tmp_path)
    assert run.returncode != 0 and "AtelierOverloaded" in run.stdout + run.stderr


def test_the_shipped_prometheus_config_loads_the_rules():
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    run = _promtool("check", "config", str(ROOT / "monitoring" / "prometheus.yml"))
    assert run.returncode == 0 and "1 rule files found" in run.stdout, run.stdout + run.stderr
