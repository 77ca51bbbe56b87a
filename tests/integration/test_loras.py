"""LoRA adapters: catalog, effect on pixels, stacking, prompt tags, affinity, LRU, bad files."""

import time
import uuid

import numpy as np
import pytest
import torch

from tests.integration.conftest import (
    BATCHED,
    FAST,
    TWO_REPLICAS,
    decode,
    pixels,
    post_many,
    replica_log,
    same_pixels,
)


def _gen(client, loras=None, prompt="a cat", seed=11, model=FAST, **extra):
    body = {"prompt": prompt, "seed": seed, "model": model, **extra}
    if loras is not None:
        body["loras"] = loras
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r


def _px(r):
    return pixels(decode(r.json()["image"]))


def test_catalog_lists_the_demo_adapters_and_leaves_out_non_safetensors(client):
    rows = {row["name"]: row for row in client.get("/v1/loras").json()["data"]}
    assert {n: (rows[n]["rank"], rows[n]["layout"], rows[n]["base_model"])
            for n in ("pixel-art", "watercolor", "sketch")} == {
        "pixel-art": (4, "peft", "sdxl"), "watercolor": (8, "peft", "sdxl"),
        "sketch": (4, "kohya", "sdxl")}
    assert rows["for-other"]["base_model"] == "acme/other"
    assert "pickled" not in rows and all(r["default_scale"] == 1.0 for r in rows.values())


@pytest.mark.parametrize("name", ["pixel-art", "watercolor", "sketch"])
def test_an_adapter_changes_the_image_and_scale_zero_gives_the_base(client, name):
    base = _px(_gen(client))
    styled = _px(_gen(client, [{"name": name}]))
    zero = _px(_gen(client, [{"name": name, "scale": 0}]))
    assert np.abs(styled - base).mean() > 1
    assert np.array_equal(zero, base)


def test_the_same_adapter_and_seed_give_the_same_pixels(client):
    a = _gen(client, [{"name": "watercolor", "scale": 0.7}]).json()["image"]
    b = _gen(client, [{"name": "watercolor", "scale": 0.7}]).json()["image"]
    assert same_pixels(a, b)


def test_stacked_adapters_differ_from_either_alone(client):
    one = _px(_gen(client, [{"name": "pixel-art"}]))
    two = _px(_gen(client, [{"name": "watercolor"}]))
    both = _px(_gen(client, [{"name": "watercolor"}, {"name": "pixel-art"}]))
    assert np.abs(both - one).mean() > 1 and np.abs(both - two).mean() > 1


def test_a_prompt_tag_is_the_same_as_the_loras_field(client):
    tagged = _gen(client, prompt="a cat <lora:pixel-art:0.6>").json()["image"]
    field = _gen(client, [{"name": "pixel-art", "scale": 0.6}], prompt="a cat").json()["image"]
    assert same_pixels(tagged, field)


def test_the_replica_keeps_the_least_recently_used_adapters_up_to_its_capacity(client):
    held = [_gen(client, [{"name": n}]).headers["x-atelier-adapters-held"].split(",")
            for n in ("pixel-art", "watercolor", "sketch", "pixel-art")]
    assert held[1] == ["pixel-art", "watercolor"]
    assert held[2] == ["watercolor", "sketch"]  # capacity 2: pixel-art went out
    assert held[3] == ["sketch", "pixel-art"]


def test_requests_for_an_adapter_stick_to_the_replica_that_holds_it(client):
    first = _gen(client, [{"name": "sketch"}], model=TWO_REPLICAS)
    replica = first.headers["x-atelier-replica"]
    # A replica reports what it holds every 0.1 s, and the report reaches the routers
    # through Serve's controller: until then a request may still go to either replica.
    time.sleep(1.5)
    later = [_gen(client, [{"name": "sketch"}], model=TWO_REPLICAS, seed=s) for s in range(6)]
    assert {r.headers["x-atelier-replica"] for r in later} == {replica}
    assert all("sketch" in r.headers["x-atelier-adapters-held"] for r in later)


def test_requests_without_adapters_spread_over_both_replicas(base_url):
    responses = post_many(base_url, [{"prompt": "x", "seed": s, "model": TWO_REPLICAS}
                                     for s in range(12)])
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["x-atelier-replica"] for r in responses}) == 2


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "nope", "pickled",
                                  "pickled.bin", "pixel-art.safetensors"])
def test_names_outside_the_catalog_are_404(client, name):
    r = client.post("/generate", json={"prompt": "x", "loras": [{"name": name}]})
    assert r.status_code == 404 and name in r.json()["detail"]


@pytest.mark.parametrize("body, reason", [
    ({"loras": [{"name": "for-other"}]}, "is for acme/other"),
    ({"loras": [{"name": "sketch"}, {"name": "sketch", "scale": 0.5}]}, "named twice"),
    ({"loras": [{"name": "sketch"}, {"name": "watercolor"}, {"name": "pixel-art"}]}, "at most 2"),
    ({"loras": [{"name": "sketch", "scale": 9}]}, "less than or equal to 4"),
    ({"loras": [{"name": "sketch", "path": "/etc"}]}, "Extra inputs"),
])
def test_bad_adapter_requests_are_422(client, body, reason):
    r = client.post("/generate", json={"prompt": "x", **body})
    assert r.status_code == 422 and reason in r.text


def test_a_bad_prompt_tag_weight_is_422_on_the_prompt(client):
    r = client.post("/generate", json={"prompt": "x <lora:sketch:lots>"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]


@pytest.mark.parametrize(("name", "why"), [("truncated", "cannot be read"),
                                         ("wrong-shape", "does not fit this model"),
                                         ("dora", "uses DoRA, which Atelier does not apply")])
def test_a_corrupt_or_misshapen_file_is_422_and_the_replica_keeps_serving(client, name, why):
    before = _gen(client, [{"name": "pixel-art"}]).json()["image"]
    r = client.post("/generate", json={"prompt": "x", "model": FAST, "loras": [{"name": name}]})
    assert r.status_code == 422 and name in r.json()["detail"] and why in r.json()["detail"]
    assert same_pixels(_gen(client, [{"name": "pixel-art"}]).json()["image"], before)
    assert client.get("/healthz").status_code == 200


def test_an_unusable_file_is_refused_before_serves_loader_would_log_a_failed_load(client):
    """Serve's multiplexing logs an ERROR line for each set its loader fails to load: the
    replica reads a set's files before it hands the set over, so a client's bad file is
    answered (the call's own line says OK) without one."""
    rid = f"unusable-adapter-{uuid.uuid4().hex}"
    r = client.post("/generate", headers={"X-Request-Id": rid},
                    json={"prompt": "x", "model": FAST, "loras": [{"name": "wrong-shape"}]})
    assert r.status_code == 422 and "does not fit this model" in r.text
    lines = replica_log("model-atelier-tiny-sdxl", rid)
    calls = [line.split(" -- ")[1].rsplit(" ", 1)[0] for line in lines if " -- CALL " in line]
    assert calls == ["CALL generate OK"], lines
    assert not [line for line in lines if line.startswith("ERROR")], lines


# Every setting the reference pipeline needs, given explicitly.
_EXACT = {"negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3,
          "guidance_scale": 7.5, "scheduler": "K_EULER"}


def test_text_encoder_parts_and_metadata_alphas_give_diffusers_own_pixels(client, made_adapters,
                                                                         tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    lettered = _px(_gen(client, [{"name": "lettered", "scale": 0.8}], seed=4, **_EXACT))
    unet_only = _px(_gen(client, [{"name": "lettered-unet", "scale": 0.8}], seed=4, **_EXACT))
    base = _px(_gen(client, seed=4, **_EXACT))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(made_adapters / "lettered.safetensors"), adapter_name="ref")
    pipe.set_adapters(["ref"], [0.8])
    reference = pipe(prompt="a cat", negative_prompt="blurry", width=64, height=64,
                     num_inference_steps=3, guidance_scale=7.5,
                     generator=[torch.Generator("cpu").manual_seed(4)]).images[0]
    assert np.abs(lettered - pixels(reference)).max() <= 1
    # The text-encoder parts count: without them the same UNet part gives another image.
    assert np.abs(lettered - unet_only).mean() > 1 and np.abs(lettered - base).mean() > 1


def test_requests_with_and_without_text_parts_share_a_call_with_their_own_images(base_url,
                                                                                 client):
    bodies = [{"prompt": "a cat", "seed": 6, "model": BATCHED, **_EXACT, **extra}
              for extra in ({"loras": [{"name": "lettered"}]}, {})]
    together = post_many(base_url, bodies)
    assert [r.headers["x-atelier-batch-size"] for r in together] == ["2", "2"]
    alone = [_gen(client, model=BATCHED, seed=6, **_EXACT, **extra)
             for extra in ({"loras": [{"name": "lettered"}]}, {})]
    for shared, single in zip(together, alone, strict=True):
        assert single.headers["x-atelier-batch-size"] == "1"
        assert np.abs(_px(shared) - _px(single)).max() <= 1
    assert np.abs(_px(together[0]) - _px(together[1])).mean() > 1
