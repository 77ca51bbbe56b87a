"""Content Credentials: images signed with a test CA's certificate, read back with the C2PA
SDK's reader; the signature covers the pixels and the label, and certificate trouble
stops the start."""

import io

import numpy as np
import pytest
from PIL import Image

from deployments.credentials import ContentCredentials
from deployments.encoding import GENERATED, encode_image
from serve.model_extras import ContentCredentialsConfig
from serve.types import MEDIA_TYPES
from tests.conftest import xmp_label
from tests.credentials import read_credentials, save_signing_files


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    chain, key = save_signing_files(tmp_path_factory.mktemp("signing"))
    return ContentCredentialsConfig(certificate=chain, private_key=key)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_a_signed_image_says_which_model_made_it_with_its_pixels_and_label_kept(signing, fmt):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 48, 3), np.uint8))
    labeled = encode_image(image, fmt, 90, "acme/sdxl")
    signed = ContentCredentials(signing).sign(labeled, MEDIA_TYPES[fmt], "acme/sdxl")
    state, codes, action = read_credentials(signed, MEDIA_TYPES[fmt])
    # Valid, its only remark that this test CA is in no trust list.
    assert (state, codes) == ("Valid", ["signingCredential.untrusted"])
    assert (action["action"], action["digitalSourceType"], action["softwareAgent"]["name"]) == (
        "c2pa.created", GENERATED, "Atelier (acme/sdxl)")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(signed))),
                          np.asarray(Image.open(io.BytesIO(labeled))))
    assert xmp_label(signed) == (GENERATED, "Atelier (acme/sdxl)")
    assert len(signed) - len(labeled) < 8192  # no thumbnail
    assert read_credentials(labeled, MEDIA_TYPES[fmt]) is None


def test_a_changed_pixel_breaks_the_signature(signing):
    image = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    signed = bytearray(ContentCredentials(signing).sign(
        encode_image(image, "png", 100, "acme/sdxl"), "image/png", "acme/sdxl"))
    at = signed.index(b"IDAT") + 8  # inside the pixel data
    signed[at] ^= 0xFF
    state, codes, _ = read_credentials(bytes(signed), "image/png")
    assert state == "Invalid" and "assertion.dataHash.mismatch" in codes


def test_a_key_that_does_not_match_the_certificate_stops_the_start(signing, tmp_path):
    _, other_key = save_signing_files(tmp_path)
    wrong = signing.model_copy(update={"private_key": other_key})
    with pytest.raises(ValueError, match=r"content_credentials: .*chain\.pem and .*key\.pem "
                                         r"cannot sign"):
        ContentCredentials(wrong)


def test_a_failed_signature_sends_the_images_with_their_label_alone(caplog):
    """The replica's fallback when signing fails after start-up (a time-stamp authority
    that stopped answering): the SDK's error is logged, the request still gets its images,
    labeled and unsigned."""
    import logging

    import c2pa

    from deployments.outputs import Outputs
    from serve.config import ModelConfig
    from serve.types import GenerationRequest

    class Unreachable:
        def sign(self, data, media_type, model):
            raise c2pa.C2paError("time-stamp authority unreachable")

    model = ModelConfig(id="acme/sdxl", embedded="tiny-sdxl")
    outputs = Outputs(model, None, None)
    outputs.credentials = Unreachable()
    request = GenerationRequest.for_model(model, "x", seed=1, request_id="r-7")
    images = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16))]
    log = logging.getLogger("ray.serve.atelier.model")  # Ray's loggers do not propagate
    log.addHandler(caplog.handler)
    try:
        out = outputs._encoded(request, images)
    finally:
        log.removeHandler(caplog.handler)
    assert len(out) == 2 and [xmp_label(d) for d in out] == [
        (GENERATED, "Atelier (acme/sdxl)")] * 2
    assert [read_credentials(d, "image/png") for d in out] == [None, None]
    assert np.asarray(Image.open(io.BytesIO(out[0])))[8, 8].tolist() == [200, 30, 30]
    assert ("acme/sdxl: signing the images of request r-7 failed: time-stamp authority "
            "unreachable") in caplog.text
