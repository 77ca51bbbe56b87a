"""The official `openai` client against the running app."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY, FAST


@pytest.fixture
def oai(base_url):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)


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
                               quality="high", user="u-1", output_format="webp",
                               output_compression=50)
    assert base64.b64decode(resp.data[0].b64_json).startswith(b"RIFF")


@pytest.mark.parametrize("kwargs, param", [
    ({"size": "65x64"}, "size"), ({"size": "4096x4096"}, "size"), ({"size": "big"}, "size"),
    ({"n": 9}, "n"), ({"extra_body": {"colour": "red"}}, "colour"),
])
def test_bad_values_raise_bad_request_naming_the_param(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model=FAST, prompt="x", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_model_raises_not_found(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.images.generate(model="dall-e-3", prompt="x")
    assert err.value.body["code"] == "model_not_found" and "dall-e-3" in err.value.message


def test_a_wrong_key_raises_authentication_error(base_url):
    bad = openai.OpenAI(api_key="nope", base_url=f"{base_url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.images.generate(model=FAST, prompt="x")
    assert err.value.body["type"] == "authentication_error"
