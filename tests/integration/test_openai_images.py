"""The official `openai` client against the running app."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import FAST, FLUX, KONTEXT, assert_same_pixels, decode, pixels


def _png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def test_b64_json_images_of_the_requested_size_and_count(oai):
    resp = oai.images.generate(model=FAST, prompt="a red cube", size="128x64", n=2,
                               response_format="b64_json")
    images = [_png(base64.b64decode(d.b64_json)) for d in resp.data]
    assert [im.size for im in images] == [(128, 64)] * 2 and resp.created > 0
    assert images[0].tobytes() != images[1].tobytes()


def test_url_images_download_without_a_key(oai):
    resp = oai.images.generate(model=FAST, prompt="a red cube", size="64x64",
                               response_format="url")
    (item,) = resp.data
    r = httpx.get(item.url)
    assert r.headers["content-type"] == "image/png" and _png(r.content).size == (64, 64)
    assert httpx.get(item.url + "x").status_code == 404


def test_default_model_and_size_come_from_the_config(oai):
    resp = oai.images.generate(prompt="a red cube")
    assert _png(base64.b64decode(resp.data[0].b64_json)).size == (64, 64)


def test_compatibility_fields_are_accepted(oai):
    resp = oai.images.generate(model="stability-ai/sdxl", prompt="x", size="64x64",
                               quality="xhigh", user="u-1", output_format="webp",
                               complexity="low", moderation="low", background="opaque",
                               output_compression=50)
    assert base64.b64decode(resp.data[0].b64_json).startswith(b"RIFF")
    assert (resp.output_format, resp.quality, resp.background, resp.size) == (
        "webp", "xhigh", "opaque", "64x64")


def test_quality_runs_a_share_of_the_models_default_steps(oai, client):
    """FLUX's test model takes 4 steps by default: low runs 1 (a third, rounded), medium 3
    and high 4, each the image /generate draws with those steps."""
    def drawn(**kwargs):
        (item,) = oai.images.generate(model=FLUX, prompt="a red cube", size="64x64",
                                      extra_body={"seed": 12}, **kwargs).data
        return _png(base64.b64decode(item.b64_json))

    by_steps = {steps: decode(client.post("/generate", json={
        "model": FLUX, "prompt": "a red cube", "seed": 12, "steps": steps}).json()["image"])
        for steps in (1, 3, 4)}
    for quality, steps in (("low", 1), ("medium", 3), ("high", 4), ("auto", 4), ("max", 4)):
        assert_same_pixels(drawn(quality=quality), by_steps[steps])
    assert_same_pixels(drawn(), by_steps[4])
    assert abs(pixels(by_steps[1]) - pixels(by_steps[4])).mean() > 5


def test_sdxl_settings_sent_with_extra_body_are_the_generate_fields(oai, client):
    """negative_prompt, num_inference_steps (over quality), guidance_scale and scheduler:
    the image /generate draws with the same values."""
    settings = {"negative_prompt": "blurry", "guidance_scale": 9, "scheduler": "DDIM",
                "seed": 21}
    (item,) = oai.images.generate(model=FAST, prompt="a lighthouse", quality="low",
                                  extra_body=settings | {"num_inference_steps": 3}).data
    direct = client.post("/generate", json={"prompt": "a lighthouse", "steps": 3,
                                            **settings}).json()["image"]
    plain = client.post("/generate", json={"prompt": "a lighthouse", "steps": 3,
                                           "seed": 21}).json()["image"]
    ours = _png(base64.b64decode(item.b64_json))
    assert_same_pixels(ours, decode(direct))
    assert abs(pixels(ours) - pixels(decode(plain))).mean() > 1
    # An edit's form carries them too (as text fields), with the image and its strength.
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(photo, format="PNG")
    edit = settings | {"num_inference_steps": 3, "prompt_strength": 0.9}
    (edited,) = oai.images.edit(model=FAST, prompt="a lighthouse", extra_body=edit,
                                image=("p.png", photo.getvalue(), "image/png")).data
    image = "data:image/png;base64," + base64.b64encode(photo.getvalue()).decode()
    direct = client.post("/generate", json={"prompt": "a lighthouse", "steps": 3,
                                            "image": image, "prompt_strength": 0.9,
                                            **settings}).json()["image"]
    assert_same_pixels(_png(base64.b64decode(edited.b64_json)), decode(direct))


@pytest.mark.parametrize("kwargs, param", [
    ({"size": "65x64"}, "size"), ({"size": "4096x4096"}, "size"), ({"size": "big"}, "size"),
    ({"n": 9}, "n"), ({"extra_body": {"colour": "red"}}, "colour"),
    ({"quality": "ultra"}, "quality"), ({"output_format": "gif", "frame_count": 4}, "output_format"),
    ({"frame_count": 4}, "frame_count"), ({"output_format": "svg"}, "output_format"),
    ({"extra_body": {"num_inference_steps": 500}}, "num_inference_steps"),
    ({"extra_body": {"scheduler": "LMS"}}, "scheduler"),
    ({"extra_body": {"guidance_scale": -1}}, "guidance_scale"),
])
def test_bad_values_raise_bad_request_naming_the_param(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=FAST, prompt="x", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_model_raises_not_found(oai):
    """dall-e-2 is not an alias of any model of the test server (dall-e-3 is)."""
    with pytest.raises(openai.NotFoundError) as err:
        oai.images.generate(model="dall-e-2", prompt="x")
    assert err.value.body["code"] == "model_not_found" and "dall-e-2" in err.value.message
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("dall-e-2")


def test_openai_model_names_configured_as_aliases_run_their_models(oai):
    """The test server serves dall-e-3 with its SDXL and gpt-image-1 with its Kontext model:
    each name draws what the model's own id draws, and `models.retrieve` names the model."""
    def generated(model):
        (item,) = oai.images.generate(model=model, prompt="a red cube", size="64x64",
                                      extra_body={"seed": 21}).data
        return _png(base64.b64decode(item.b64_json))

    assert_same_pixels(generated("dall-e-3"), generated(FAST))
    assert not np.array_equal(pixels(generated("dall-e-3")), pixels(generated(FLUX)))

    def edited(model):
        (item,) = oai.images.edit(model=model, image=("p.png", _red_png(), "image/png"),
                                  prompt="make it blue", extra_body={"seed": 21}).data
        return _png(base64.b64decode(item.b64_json))

    # Kontext answers an edit at its default area (96x96 here); the SDXL at the image's size.
    by_alias = edited("gpt-image-1")
    assert by_alias.size == (96, 96) and edited(FAST).size == (64, 64)
    assert_same_pixels(by_alias, edited(KONTEXT))
    found = oai.models.retrieve("gpt-image-1")
    assert (found.id, found.owned_by, found.model_extra["model"]) == (
        "gpt-image-1", "atelier", KONTEXT)


def _red_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def test_a_wrong_key_raises_authentication_error(base_url):
    bad = openai.OpenAI(api_key="nope", base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.images.generate(model=FAST, prompt="x")
    assert err.value.body["type"] == "authentication_error"


def _pixels(b64):
    import numpy as np

    return np.asarray(_png(base64.b64decode(b64)).convert("RGB")).astype(int)


def test_a_streamed_generation_sends_its_partial_images_then_the_image(oai):
    import numpy as np

    from tests.integration.conftest import FLUX

    kwargs = {"model": FLUX, "prompt": "a leather bag", "extra_body": {"seed": 12}}
    events = list(oai.images.generate(stream=True, partial_images=2, **kwargs))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "64x64" and e.output_format == "png" for e in events)
    plain = oai.images.generate(**kwargs)
    final = _pixels(events[-1].b64_json)
    assert np.abs(final - _pixels(plain.data[0].b64_json)).max() <= 1
    partials = [_pixels(e.b64_json) for e in events[:2]]
    assert all(p.shape == (64, 64, 3) and np.abs(p - final).mean() > 0 for p in partials)
    assert np.abs(partials[1] - final).mean() < np.abs(partials[0] - final).mean()


def test_a_streamed_edit_uses_the_edit_events_and_zero_partials_send_only_the_image(oai):
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(photo, format="PNG")
    events = list(oai.images.edit(model=FAST, image=("p.png", photo.getvalue(), "image/png"),
                                  prompt="a blue square", stream=True, partial_images=1,
                                  extra_body={"prompt_strength": 1}))  # both steps run
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    events = list(oai.images.generate(model=FAST, prompt="x", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert _png(base64.b64decode(events[0].b64_json)).size == (64, 64)


@pytest.mark.parametrize("kwargs, param", [({"n": 2}, "n"), ({"partial_images": 4},
                                                            "partial_images")])
def test_bad_streamed_requests_are_refused_before_the_stream(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=FAST, prompt="x", stream=True, **kwargs)
    assert err.value.body["param"] == param
