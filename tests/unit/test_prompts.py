"""Prompt embeddings made before the pipeline call: held by (prompt, negative prompt),
encoded once however many threads ask, and giving the pixels of an in-call encoding."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments.engines.prompts import PromptCache, stack
from serve.types import GenerationRequest


def _req(prompt="a red cube", seed=1, **overrides):
    base = {"model": "a/b", "prompt": prompt, "width": 64, "height": 64,
            "num_inference_steps": 3, "guidance_scale": 7.5, "seed": seed,
            "scheduler": "K_EULER"}
    return GenerationRequest(**{**base, **overrides})


class _Encoder:
    """Counts calls; each prompt's 'embedding' is its length, after a pause long enough
    for another thread to arrive meanwhile."""

    def __init__(self, pause_s=0.0):
        self.calls, self.pause_s, self.active, self.most_active = [], pause_s, 0, 0

    def __call__(self, prompt, negative, clip_skip=0):
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        time.sleep(self.pause_s)
        self.calls.append((prompt, negative))
        self.active -= 1
        return (torch.full((1, 2), float(len(prompt))),)


def test_a_prompt_is_encoded_once_and_then_held():
    encoder = _Encoder()
    cache = PromptCache(encoder)
    first, held_first = cache.get(_req())
    again, held_again = cache.get(_req(seed=9, num_outputs=3))
    other, _ = cache.get(_req(negative_prompt="blurry"))
    assert (held_first, held_again) == (False, True)
    assert again is first
    assert encoder.calls == [("a red cube", ""), ("a red cube", "blurry")]
    assert other is not first


def test_the_least_recently_used_prompt_leaves_first():
    encoder = _Encoder()
    cache = PromptCache(encoder, entries=2)
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        cache.get(_req(prompt))
    assert [held for _, held in (cache.get(_req("a")), cache.get(_req("c")),
                                 cache.get(_req("b")))] == [True, True, False]
    assert [p for p, _ in encoder.calls] == ["a", "b", "c", "b"]


def test_threads_asking_for_one_prompt_encode_it_once_and_never_together():
    encoder = _Encoder(pause_s=0.05)
    cache = PromptCache(encoder)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: cache.get(_req(p)), ["x", "x", "y", "x"]))
    assert sorted(p for p, _ in encoder.calls) == ["x", "y"]
    assert encoder.most_active == 1  # fast tokenizers refuse concurrent use
    assert sum(not held for _, held in results) == 2
    assert results[0][0] is results[1][0] is results[3][0]


def test_stack_repeats_each_requests_embeddings_per_image():
    a, b = (torch.tensor([[1.0]]), torch.tensor([[10.0]])), (torch.tensor([[2.0]]),
                                                             torch.tensor([[20.0]]))
    out = stack(("e", "p"), [_req(num_outputs=2), _req(num_outputs=1)], [a, b])
    assert out["e"].flatten().tolist() == [1.0, 1.0, 2.0]
    assert out["p"].flatten().tolist() == [10.0, 10.0, 20.0]


def _pixels(result):
    return [np.asarray(im).astype(int) for own in result for im in own]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_prepared_prompts_give_the_pixels_of_prompts_encoded_in_the_call(
        family, request):
    engine = request.getfixturevalue(family)
    extra = {"negative_prompt": "blurry"} if family == "sdxl" else {}
    scheduler = "K_EULER" if family == "sdxl" else "FlowMatchEuler"
    requests = [_req("a blue ball", 3, num_outputs=2, scheduler=scheduler, **extra),
                _req("a green hat", 5, scheduler=scheduler)]
    in_call = engine.generate(requests)
    engine.prompts = PromptCache(engine._encode_prompt)  # nothing held from that call
    prepared = [engine.prepare(r) for r in requests]
    assert [held for _, held in prepared] == [False, False]
    ahead = engine.generate(requests, prepared=[made for made, _ in prepared])
    assert [len(own) for own in ahead] == [2, 1]
    for a, b in zip(_pixels(in_call), _pixels(ahead), strict=True):
        assert np.array_equal(a, b)


def test_a_prompt_is_prepared_while_another_call_runs_and_that_call_is_unchanged(sdxl):
    request = _req("a yellow boat", 21, num_inference_steps=8)
    alone = sdxl.generate([request])
    started, prepared = threading.Event(), []

    def on_step(step, total):
        if step == 1:
            started.set()
            time.sleep(0.2)  # the other thread encodes meanwhile

    def prepare():
        started.wait(10)
        prepared.append(sdxl.prepare(_req("a purple tent")))

    encoder_calls = []
    hook = sdxl.pipe.text_encoder.register_forward_hook(lambda *a: encoder_calls.append(1))
    try:
        thread = threading.Thread(target=prepare)
        thread.start()
        during = sdxl.generate([request], on_step=on_step)
        thread.join()
    finally:
        hook.remove()
    assert np.array_equal(_pixels(alone)[0], _pixels(during)[0])
    (made, held), = prepared
    assert not held and made.embeds[0].shape[0] == 1 and made.source is None
    # The running call's prompt was held from the first call; only the new one was encoded
    # (the CLIP encoder runs for the prompt; the empty negative prompt is zeros in SDXL).
    assert len(encoder_calls) == 1


def test_input_images_are_prepared_as_8_bit_tensors_and_give_the_in_call_pixels(sdxl):
    from serve.types import SourceImage

    rng = np.random.default_rng(4)
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    requests = [_req("a chair", 6, num_outputs=2,
                     source=SourceImage(photo.tobytes(), 0.8, mask.tobytes())),
                _req("a desk", 8, source=SourceImage((255 - photo).tobytes(), 0.8,
                                                      mask.tobytes()))]
    made, _ = sdxl.prepare(requests[0])
    image, kept, references = made.source
    assert references == ()
    assert image.dtype == kept.dtype == torch.uint8
    assert image.shape == (1, 3, 64, 64) and kept.shape == (1, 1, 64, 64)
    assert np.array_equal(image[0].permute(1, 2, 0).numpy(), photo)
    assert np.array_equal(kept[0, 0].numpy(), mask)
    in_call = sdxl.generate(requests)
    ahead = sdxl.generate(requests, prepared=[sdxl.prepare(r)[0] for r in requests])
    for a, b in zip(_pixels(in_call), _pixels(ahead), strict=True):
        assert np.array_equal(a, b)
    # Outside the mask the input's pixels are kept exactly.
    outside = mask == 0
    assert np.array_equal(_pixels(ahead)[0][outside], photo[outside])
