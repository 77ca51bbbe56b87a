"""Where a call's time goes, by kind of work: matrix products, convolutions, attention,
normalisation, the rest. On a GPU it sums the self time of the CUDA kernels the profiler
saw; on a CPU, the self time of the aten operators.

Used by `load.bench_engine --profile`: a denoising step that is 90 % matrix products at a
given TFLOP/s calls for other work than one that waits on attention or on element-wise
kernels."""

from __future__ import annotations

import re
from collections.abc import Callable

# Tried in order; the first kind whose pattern matches a kernel or operator name wins.
# Convolutions come before matrix products: cuDNN names its convolution kernels
# "...fprop_implicit_gemm...". Attention comes first of all: its kernels hold "gemm" too.
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.IGNORECASE)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|implicit", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|matmul|(?<![a-z])mm(?![a-z])|addmm|bmm|nvjet|cutlass|xmma",
                          re.IGNORECASE)),
    ("normalisation", re.compile(r"norm", re.IGNORECASE)),
)


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator name stands for ("other" when none fits)."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def op_breakdown(run: Callable[[], object], top: int = 12) -> dict:
    """Profile one `run()`; return milliseconds and share per kind, and the `top` kernels
    (or operators) by time. Raises RuntimeError if the profiler saw no work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            us = event.self_device_time_total if event.device_type.name == "CUDA" else 0
        else:
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us / 1000
    total = sum(times.values())
    if total <= 0:
        raise RuntimeError("the profiler saw no kernels or operators")
    kinds: dict[str, float] = {}
    for name, ms in times.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
    return {"measured": "cuda kernels" if cuda else "cpu aten operators",
            "total_ms": total,
            "kinds": {k: {"ms": ms, "share": ms / total}
                      for k, ms in sorted(kinds.items(), key=lambda item: -item[1])},
            "top": [{"name": name[:120], "kind": kind_of(name), "ms": ms,
                     "share": ms / total} for name, ms in ranked]}
