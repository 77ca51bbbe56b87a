"""cluster.yaml, serve_cluster.yaml and rayservice.yaml, checked by Ray's own validation
and against each other (GPUs declared = replicas asked for)."""

import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from serve.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    return yaml.safe_load((ROOT / name).read_text())


def _gpus(command: str) -> int:
    return int(re.search(r"--num-gpus=(\d+)", command)[1])


def _atelier(serve_config: dict):
    schema = ServeDeploySchema.model_validate(serve_config)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    return parse_config(app.args["atelier"])


def test_cluster_yaml_passes_rays_cluster_launcher_validation():
    config = _load("cluster.yaml")
    validate_config(prepare_config(config))  # what `ray up` runs; raises when invalid
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) + 1 == 2  # two servers


def test_every_server_starts_ray_with_gpus_and_the_metrics_port():
    config = _load("cluster.yaml")
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    assert all("--metrics-export-port=8080" in c and _gpus(c) >= 1 for c in starts)
    assert any("serve deploy serve_cluster.yaml" in c for c in config["head_start_ray_commands"])


def test_the_cluster_serve_config_asks_one_replica_per_gpu_of_the_cluster():
    cluster = _load("cluster.yaml")
    gpus = sum(_gpus(c) for c in cluster["head_start_ray_commands"] +
               cluster["worker_start_ray_commands"] if "ray start" in c)
    (model,) = _atelier(_load("serve_cluster.yaml")).models
    assert model.device == "cuda" and model.replicas == gpus


def test_the_rayservice_serves_the_same_models_on_as_many_gpus():
    manifest = _load("rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    atelier = _atelier(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert atelier.models == _atelier(_load("serve_cluster.yaml")).models
    cluster = manifest["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in workers)
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in workers]
    assert all(lim["nvidia.com/gpu"] == int(g["rayStartParams"]["num-gpus"])
               for lim, g in zip(limits, workers))
    assert atelier.models[0].replicas == gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
