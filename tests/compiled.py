"""What compiled code a call ran: the profiler's record of the compiled regions entered
(dynamo's blocks run uncompiled enter none), and how many graphs it compiled."""

from collections.abc import Callable

from torch._dynamo.utils import counters
from torch.profiler import profile


def compiled_run(call: Callable[[], object]) -> tuple[object, int, int]:
    """`call()`'s result, the compiled regions it entered and the graphs it compiled."""
    captured = counters["stats"]["calls_captured"]
    with profile() as prof:
        out = call()
    regions = sum(event.name.startswith("Torch-Compiled Region") for event in prof.events())
    return out, regions, counters["stats"]["calls_captured"] - captured
