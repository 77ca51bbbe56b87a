"""Replicate's hardware and collections through the official `replicate` client, and what
its API changes that the config decides here (models, versions, trainings)."""

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from tests.integration.conftest import (
    AUTH,
    BATCHED,
    CANNY,
    DEPTH,
    FAST,
    FILL,
    FLUX,
    INPAINTING,
    KONTEXT,
    MODELS_KEY,
    REDUX,
)


def _names(collection) -> list[str]:
    return [f"{m.owner}/{m.name}" for m in collection]


def test_the_hardware_is_the_clusters(rep, base_url):
    # The test cluster is one Ray node declaring 24 CPUs and no GPU.
    assert [(h.sku, h.name) for h in rep.hardware.list()] == [("cpu", "CPU")]
    assert httpx.get(f"{base_url}/v1/hardware", headers=AUTH).json() == [
        {"sku": "cpu", "name": "CPU", "count": 24, "servers": 1}]


def test_collections_group_the_served_models_by_what_they_do(rep):
    page = rep.collections.list()
    assert [c.slug for c in page.results] == ["text-to-image", "image-editing", "control-net",
                                              "super-resolution", "sdxl", "flux"]
    assert page.next is None and page.results[0].name == "Text to image"
    assert _names(rep.collections.get("image-editing")) == [INPAINTING, KONTEXT, FILL]
    assert _names(rep.collections.get("control-net")) == [FAST, FLUX, CANNY, DEPTH]
    assert _names(rep.collections.get("flux")) == [FLUX, KONTEXT, FILL, CANNY, DEPTH, REDUX]
    text = _names(rep.collections.get("text-to-image"))
    assert text[:2] == [FAST, BATCHED] and FLUX in text and REDUX in text
    assert not {INPAINTING, KONTEXT, FILL, CANNY, DEPTH} & set(text)
    # An upscaling alias is there as the upscaler it runs as, with that version.
    upscalers = rep.collections.get("super-resolution")
    assert _names(upscalers) == ["nightmareai/real-esrgan"]
    assert upscalers[0].description == "image upscaling served by Atelier"
    assert (upscalers[0].latest_version.id
            == rep.models.get("nightmareai/real-esrgan").latest_version.id)
    with pytest.raises(ReplicateError) as missing:
        rep.collections.get("video")
    assert missing.value.status == 404 and "GET /v1/collections" in missing.value.detail


def test_a_key_sees_only_the_collections_of_its_models(base_url):
    # MODELS_KEY may use FLUX (by its alias flux-dev) and BATCHED.
    limited = replicate.Client(api_token=MODELS_KEY, base_url=base_url)
    assert [c.slug for c in limited.collections.list().results] == [
        "text-to-image", "control-net", "sdxl", "flux"]
    assert _names(limited.collections.get("text-to-image")) == [BATCHED, FLUX]
    with pytest.raises(ReplicateError) as hidden:
        limited.collections.get("image-editing")
    assert hidden.value.status == 404


def test_models_versions_and_trainings_are_the_configs_and_none_is_trained(rep):
    with pytest.raises(ReplicateError) as made:
        rep.models.create(owner="acme", name="sdxl-x", visibility="private",
                          hardware="gpu-h100")
    assert made.value.status == 405 and "config" in made.value.detail
    version = rep.models.get(FAST).latest_version.id
    with pytest.raises(ReplicateError) as deleted:
        rep.models.get(FAST).versions.delete(version)
    assert deleted.value.status == 405
    with pytest.raises(ReplicateError) as trained:
        rep.trainings.create(model=FAST, version=version, destination="acme/sdxl-x",
                             input={"input_images": "https://example.com/photos.zip"})
    assert trained.value.status == 405 and "lora folder" in trained.value.detail
    assert rep.trainings.list().results == []
    with pytest.raises(ReplicateError) as missing:
        rep.trainings.get("t1")
    assert missing.value.status == 404 and missing.value.title == "Training not found"
    # The model and its version are as they were.
    assert rep.models.get(FAST).latest_version.id == version
