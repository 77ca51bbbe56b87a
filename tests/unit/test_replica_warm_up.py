"""A replica's start-up warm-up runs each kind of work on the thread that runs it when
serving, so that no thread's first use of the device falls on a first request."""

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from serve.config import ModelConfig

MODEL = ModelConfig(id="a/sdxl", embedded="tiny-sdxl", dtype="float32",
                    defaults={"width": 64, "height": 64, "num_inference_steps": 2},
                    warmup_steps=1)


class _Recording:
    """The engine as the replica calls it, recording the thread of each call."""

    def __init__(self, engine):
        self.engine, self.threads = engine, []

    def warm_up(self, request, max_images):
        self.threads.append(("warm_up", threading.current_thread().name))
        return self.engine.warm_up(request, max_images)

    def prepare(self, request):
        made, held = self.engine.prepare(request)
        self.threads.append(("prepare", threading.current_thread().name, held))
        return made, held


def test_the_warm_up_runs_on_the_pipeline_thread_and_encodes_a_prompt_on_the_prompt_thread(
        tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine
    from deployments.model import ModelDeployment

    engine = _Recording(SDXLEngine(tiny_sdxl_path, "float32", "cpu"))
    with (ThreadPoolExecutor(1, thread_name_prefix="pipeline") as pipeline,
          ThreadPoolExecutor(1, thread_name_prefix="prompts") as prompts,
          ThreadPoolExecutor(2, thread_name_prefix="encode-read") as workers):
        replica = SimpleNamespace(cfg=MODEL, engine=engine, checker=None, _executor=pipeline,
                                  _prompts=prompts, _workers=workers)
        replica._warm_request = lambda steps: ModelDeployment.func_or_class._warm_request(
            replica, steps)
        ModelDeployment.func_or_class._warm_up(replica)
    (kind, thread), (prepared, prompt_thread, held) = engine.threads
    assert kind == "warm_up" and thread.startswith("pipeline")
    # A prompt of its own: the text encoders ran on the prompt thread, not found held.
    assert prepared == "prepare" and prompt_thread.startswith("prompts") and not held
