"""The cluster's hardware as `GET /v1/hardware` lists it, from the nodes as `ray.nodes()`
gives them, and the Ray options that pin a model's replicas to a GPU type."""

from serve.app import _actor_options
from serve.config import ModelConfig
from serve.hardware import cluster_hardware, sku


def _node(alive: bool = True, **resources: float) -> dict:
    return {"Alive": alive, "NodeManagerAddress": "10.0.0.11",
            "Resources": {"memory": 2.0**36, "node:10.0.0.11": 1.0} | resources}


def test_hardware_counts_cpus_then_each_gpu_type_over_the_alive_servers():
    nodes = [_node(CPU=64, GPU=2, **{"accelerator_type:RTX-PRO-6000": 1}),
             _node(CPU=32, GPU=4, **{"accelerator_type:L40S": 1}),
             _node(CPU=64, GPU=2, **{"accelerator_type:RTX-PRO-6000": 1}),
             _node(alive=False, CPU=128, GPU=8, **{"accelerator_type:H100": 1}),
             _node(CPU=16)]
    assert cluster_hardware(nodes) == [
        {"sku": "cpu", "name": "CPU", "count": 176, "servers": 4},
        {"sku": "gpu-rtx-pro-6000", "name": "RTX PRO 6000 GPU", "count": 4, "servers": 2},
        {"sku": "gpu-l40s", "name": "L40S GPU", "count": 4, "servers": 1}]


def test_gpus_of_a_server_without_a_type_are_plain_gpus():
    assert cluster_hardware([_node(CPU=8, GPU=1)])[1] == {
        "sku": "gpu", "name": "GPU", "count": 1, "servers": 1}
    assert cluster_hardware([]) == [{"sku": "cpu", "name": "CPU", "count": 0, "servers": 0}]
    assert (sku("H100"), sku(None)) == ("gpu-h100", "gpu")


def _model(**fields) -> ModelConfig:
    return ModelConfig(id="acme/sdxl", embedded="tiny-sdxl", **fields)


def test_a_replica_asks_ray_for_its_gpu_type_only_when_it_takes_a_gpu():
    pinned = _model(accelerator_type="RTX-PRO-6000", gpu_share=0.5, num_cpus=2)
    assert _actor_options(pinned, 0.5) == {"num_gpus": 0.5, "num_cpus": 2,
                                           "accelerator_type": "RTX-PRO-6000"}
    # device auto on a cluster without GPUs: on CPU, anywhere.
    assert _actor_options(pinned, 0) == {"num_gpus": 0, "num_cpus": 2}
    assert _actor_options(_model(), 1.0) == {"num_gpus": 1.0, "num_cpus": 1.0}
