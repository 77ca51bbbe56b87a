"""Each API's images say in their metadata that a model generated them, and which (IPTC's
trainedAlgorithmicMedia in XMP), and carry Content Credentials signed with the test CA's
certificate, unless the model's config turns labels off (TWO_REPLICAS)."""

import base64

import httpx
import openai

from tests.conftest import xmp_label
from tests.credentials import read_credentials
from tests.integration.conftest import API_KEY, AUTH, FAST, TWO_REPLICAS

_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def test_every_apis_images_are_labeled_with_their_model(base_url, client, rep):
    png = client.post("/generate", json={"prompt": "a cat", "seed": 1, "model": FAST},
                      headers={"Accept": "image/png"}).content
    (webp,) = rep.run(FAST, input={"prompt": "a cat", "seed": 1})
    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    (jpeg,) = oai.images.generate(model=FAST, prompt="a cat", size="64x64",
                                  response_format="b64_json", output_format="jpeg").data
    for data, media_type in ((png, "image/png"), (webp.read(), "image/webp"),
                             (base64.b64decode(jpeg.b64_json), "image/jpeg")):
        assert xmp_label(data) == (_GENERATED, f"Atelier ({FAST})")
        state, codes, action = read_credentials(data, media_type)
        assert (state, codes) == ("Valid", ["signingCredential.untrusted"])  # a test CA
        assert (action["digitalSourceType"], action["softwareAgent"]["name"]) == (
            _GENERATED, f"Atelier ({FAST})")


def test_a_model_may_leave_its_images_unlabeled(base_url):
    r = httpx.post(f"{base_url}/generate", json={"prompt": "a cat", "model": TWO_REPLICAS},
                   headers={**AUTH, "Accept": "image/png"}, timeout=60)
    assert r.content.startswith(b"\x89PNG") and xmp_label(r.content) is None
    assert read_credentials(r.content, "image/png") is None
