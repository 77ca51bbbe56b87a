import asyncio
from collections import defaultdict

import httpx

from tests.integration.conftest import (
    AUTH,
    BATCHED,
    MODELS_KEY,
    assert_same_pixels,
    decode,
    post_many,
)


def _body(seed, **extra):
    return {"prompt": f"prompt {seed}", "seed": seed, "model": BATCHED, **extra}


def test_concurrent_compatible_requests_share_pipeline_calls(base_url, client):
    responses = post_many(base_url, [_body(s) for s in (11, 12, 13, 14)])
    assert [r.status_code for r in responses] == [200] * 4
    batch_ids = {r.headers["x-atelier-batch-id"] for r in responses}
    assert len(batch_ids) < 4
    assert all(int(r.headers["x-atelier-batch-size"]) >= 2 for r in responses)
    assert [r.json()["seed"] for r in responses] == [11, 12, 13, 14]


def test_a_seed_gives_the_same_pixels_alone_or_among_concurrent_requests(base_url, client):
    alone = client.post("/generate", json=_body(21))
    assert alone.headers["x-atelier-batch-size"] == "1"
    crowd = post_many(base_url, [_body(22), _body(21), _body(23, num_outputs=2)])
    assert crowd[1].headers["x-atelier-batch-size"] == "4"
    assert_same_pixels(decode(alone.json()["image"]), decode(crowd[1].json()["image"]))


def test_requests_with_different_adapters_share_a_call_and_keep_their_own_pixels(
        base_url, client):
    sets = [[{"name": "pixel-art"}], [{"name": "sketch", "scale": 0.6}], None,
            [{"name": "pixel-art"}, {"name": "watercolor", "scale": 0.5}]]
    bodies = [_body(60 + i, **({"loras": s} if s else {})) for i, s in enumerate(sets)]
    alone = [client.post("/generate", json=body) for body in bodies]
    assert [r.headers["x-atelier-batch-size"] for r in alone] == ["1"] * 4
    crowd = post_many(base_url, bodies)
    assert len({r.headers["x-atelier-batch-id"] for r in crowd}) == 1
    assert [r.headers["x-atelier-batch-size"] for r in crowd] == ["4"] * 4
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(decode(own.json()["image"]), decode(shared.json()["image"]))


def test_requests_with_different_guidance_scales_share_a_call_and_keep_their_own_pixels(
        base_url, client):
    """Guidance scales and guidance rescales both."""
    scales = [7.5, 4.0, 11.0, 1.0]  # the last is not guided: it runs apart
    rescales = [0.0, 0.7, 0.3, 0.0]
    bodies = [_body(70 + i, guidance_scale=g, guidance_rescale=r)
              for i, (g, r) in enumerate(zip(scales, rescales, strict=True))]
    alone = [client.post("/generate", json=body) for body in bodies]
    assert [r.headers["x-atelier-batch-size"] for r in alone] == ["1"] * 4
    crowd = post_many(base_url, bodies)
    guided = {r.headers["x-atelier-batch-id"] for r in crowd[:3]}
    assert len(guided) == 1 and crowd[3].headers["x-atelier-batch-id"] not in guided
    assert [r.headers["x-atelier-batch-size"] for r in crowd] == ["3", "3", "3", "1"]
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(decode(own.json()["image"]), decode(shared.json()["image"]))


def test_requests_enlarged_by_other_factors_share_a_call_and_each_gets_its_own_size(
        base_url, client):
    bodies = [_body(80), _body(81, upscale=2, upscaler="bicubic"),
              _body(82, upscale=1.5, upscaler="bicubic")]
    alone = [client.post("/generate", json=body) for body in bodies]
    crowd = post_many(base_url, bodies)
    assert len({r.headers["x-atelier-batch-id"] for r in crowd}) == 1
    assert [r.headers["x-atelier-batch-size"] for r in crowd] == ["3"] * 3
    sizes = [(64, 64), (128, 128), (96, 96)]
    assert [(r.json()["width"], r.json()["height"]) for r in crowd] == sizes
    for own, shared, size in zip(alone, crowd, sizes, strict=True):
        image = decode(shared.json()["image"])
        assert image.size == size
        assert_same_pixels(decode(own.json()["image"]), image)


def test_prompts_of_other_chunk_counts_share_a_call_and_keep_their_own_pixels(
        base_url, client):
    """BATCHED reads up to three chunks of 75 tokens: prompts of one, two and three
    share a call, each image its own call's (the tiny tokenizer reads "the" as one)."""
    bodies = [_body(90), _body(91, prompt=" ".join(["the"] * 100)),
              _body(92, prompt=" ".join(["the"] * 200))]
    alone = [client.post("/generate", json=body) for body in bodies]
    crowd = post_many(base_url, bodies)
    assert len({r.headers["x-atelier-batch-id"] for r in crowd}) == 1
    assert [r.headers["x-atelier-batch-size"] for r in crowd] == ["3"] * 3
    for own, shared in zip(alone, crowd, strict=True):
        assert_same_pixels(decode(own.json()["image"]), decode(shared.json()["image"]))


def test_mixed_requests_are_grouped_by_size_and_steps_in_order(base_url):
    shapes = [{"width": 64}, {"width": 128}, {"width": 64}, {"width": 128, "steps": 3},
              {"width": 128}]
    responses = post_many(base_url, [_body(30 + i, **s) for i, s in enumerate(shapes)])
    groups = defaultdict(list)
    for shape, r in zip(shapes, responses, strict=True):
        assert r.status_code == 200
        assert decode(r.json()["image"]).size == (shape["width"], 64)
        groups[r.headers["x-atelier-batch-id"]].append((shape["width"], shape.get("steps", 2)))
    # Three compatible groups: (64, default), (128, default), (128, 3 steps).
    assert sorted(groups.values()) == [[(64, 2), (64, 2)], [(128, 2), (128, 2)], [(128, 3)]]


def test_num_outputs_fill_the_batch(base_url):
    responses = post_many(base_url, [_body(40, num_outputs=3), _body(41, num_outputs=2)])
    # 3 + 2 images exceed the batch of 4: two calls, in arrival order.
    assert [r.headers["x-atelier-batch-size"] for r in responses] == ["3", "2"]
    assert [len(r.json()["images"]) for r in responses] == [3, 2]


def test_image_requests_share_calls_with_their_own_kind_only(base_url):
    import base64
    import io

    import numpy as np
    from PIL import Image

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    rng = np.random.default_rng(5)
    photos = [png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    mask = png(np.full((64, 64), 255, np.uint8))
    bodies = [_body(50, image=photos[0]), _body(51), _body(52, image=photos[1]),
              _body(53, image=photos[0], mask=mask), _body(54, image=photos[1], mask=mask),
              _body(55, image=photos[0], prompt_strength=0.5)]
    responses = post_many(base_url, bodies)
    assert [r.status_code for r in responses] == [200] * 6
    calls = [r.headers["x-atelier-batch-id"] for r in responses]
    # Two img2img photos at 0.8 share a call, as do the two inpaintings; text-to-image and
    # the other strength each run apart.
    assert calls[0] == calls[2] and calls[3] == calls[4]
    assert len({calls[0], calls[1], calls[3], calls[5]}) == 4
    assert [r.headers["x-atelier-batch-size"] for r in responses] == ["2", "1", "2", "2", "2",
                                                                       "1"]


def test_a_higher_priority_keys_request_runs_before_an_older_one(base_url):
    """On the batched model (a 2 s window): a request of priority 0, then 300 ms later one
    of another size (another call) from team-c's key (priority 5), which runs first."""
    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
            low = asyncio.create_task(c.post("/generate", headers=AUTH, json=_body(81)))
            await asyncio.sleep(0.3)
            high = asyncio.create_task(c.post(
                "/generate", headers={"Authorization": f"Bearer {MODELS_KEY}"},
                json=_body(82, width=128)))
            return await asyncio.gather(low, high)

    low, high = asyncio.run(run())
    calls = [int(r.headers["x-atelier-batch-id"].rsplit("-", 1)[1]) for r in (low, high)]
    assert calls[1] < calls[0], calls
    assert [r.headers["x-atelier-batch-size"] for r in (low, high)] == ["1", "1"]
