"""The cluster's hardware, as Replicate's API lists it (`replicate.hardware.list()`): its
servers' CPUs, and their GPUs by type, with how many of each and on how many servers.

A GPU type is the one Ray finds on a server (its `accelerator_type:` resource, e.g.
`RTX-PRO-6000`), as a model's `accelerator_type` names it; its sku is `gpu-` and the type
in lower case. GPUs of a server without a type (declared with `--num-gpus` alone) are
`gpu`.
"""

from __future__ import annotations

_TYPE = "accelerator_type:"


def sku(accelerator_type: str | None) -> str:
    """The sku of a GPU type (`gpu`: any GPU)."""
    return f"gpu-{accelerator_type.lower()}" if accelerator_type else "gpu"


def gpu_types(resources: dict[str, float]) -> set[str]:
    """The GPU types among Ray resources (a node's, or the cluster's)."""
    return {key.removeprefix(_TYPE) for key in resources if key.startswith(_TYPE)}


def cluster_hardware(nodes: list[dict]) -> list[dict]:
    """The hardware of the alive servers among `nodes` (as `ray.nodes()` gives them): the
    CPUs first, then each GPU type in order of first appearance."""
    hardware = {"cpu": {"sku": "cpu", "name": "CPU", "count": 0, "servers": 0}}
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        found = [("cpu", "CPU", resources.get("CPU", 0))]
        if resources.get("GPU", 0) > 0:
            kind = next(iter(gpu_types(resources)), None)  # (one per server)
            name = f"{kind.replace('-', ' ')} GPU" if kind else "GPU"
            found.append((sku(kind), name, resources["GPU"]))
        for code, name, count in found:
            entry = hardware.setdefault(code, {"sku": code, "name": name, "count": 0,
                                               "servers": 0})
            entry["count"] += round(count)
            entry["servers"] += 1
    return list(hardware.values())
