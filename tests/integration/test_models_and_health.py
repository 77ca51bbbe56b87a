from tests.integration.conftest import (
    AUTOSCALED,
    BATCHED,
    CANNY,
    CHECKED,
    DEADLINE,
    DEPTH,
    FAST,
    FILL,
    FLUX,
    INPAINTING,
    KONTEXT,
    ONE_SLOT,
    REDUX,
    RESTARTABLE,
    SMALL_MEMORY,
    STALL,
    TWO_REPLICAS,
)


def test_models_are_listed_in_openai_shape(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [FAST, BATCHED, ONE_SLOT, TWO_REPLICAS,
                                          RESTARTABLE, DEADLINE, SMALL_MEMORY,
                                          STALL, CHECKED, INPAINTING, AUTOSCALED, FLUX,
                                          KONTEXT, FILL,
                                          CANNY, DEPTH, REDUX]
    first = body["data"][0]
    assert first["object"] == "model" and first["owned_by"] == "atelier"
    assert first["aliases"] == ["stability-ai/sdxl", "dall-e-3"] and first["limits"]["max_size"] == 512
    assert first["upscaling_aliases"] == ["nightmareai/real-esrgan"]
    assert all(m["upscaling_aliases"] == [] for m in body["data"][1:])
    assert (first["family"], first["defaults"]["scheduler"]) == ("sdxl", "K_EULER")
    assert (first["inpainting"], first["textual_inversions"]) == (False, [])
    assert first["options"] == {"tiling": True, "hires": True, "variations": True,
                                "upscale": True}
    inpainting = next(m for m in body["data"] if m["id"] == INPAINTING)
    assert inpainting["options"] == {"tiling": True, "hires": False, "variations": False,
                                     "upscale": True}
    assert first["schedulers"][:2] == ["K_EULER", "K_EULER_ANCESTRAL"]
    assert "LCM" in first["schedulers"] and "FlowMatchEuler" not in first["schedulers"]
    flux, kontext, fill, canny, depth, redux = body["data"][-6:]
    assert (flux["family"], flux["aliases"]) == ("flux", ["black-forest-labs/flux-dev"])
    assert flux["defaults"]["scheduler"] == "FlowMatchEuler"
    assert flux["schedulers"] == ["FlowMatchEuler"]
    assert flux["options"] == {"tiling": False, "hires": True, "variations": True,
                               "upscale": True}
    assert kontext["options"] == {"tiling": False, "hires": False, "variations": True,
                                  "upscale": False}
    assert fill["options"] == {"tiling": False, "hires": False, "variations": False,
                               "upscale": False}
    assert (flux["kontext"], first["kontext"]) == (False, False)
    assert (kontext["family"], kontext["kontext"], kontext["fill"]) == ("flux", True, False)
    assert (fill["family"], fill["kontext"], fill["fill"]) == ("flux", False, True)
    assert (canny["family"], canny["fill"], canny["canny"]) == ("flux", False, True)
    assert (depth["canny"], depth["depth"], canny["depth"]) == (False, True, False)
    assert (redux["family"], redux["redux"], flux["redux"]) == (
        "flux", {"downsampling": 1, "pictures": 4}, None)
    assert redux["aliases"] == ["black-forest-labs/flux-redux-dev"]
    assert (flux["ip_adapter"], redux["ip_adapter"]) == ({
        "scale": 0.6, "extra": {}, "pictures": 4, "masks": False, "blocks": ["all"]}, None)


def test_both_official_clients_list_the_same_models(base_url, rep):
    import openai

    from tests.integration.conftest import API_KEY

    oai = openai.OpenAI(api_key=API_KEY, base_url=f"{base_url}/v1", max_retries=0)
    listed = [m.id for m in oai.models.list()]
    page = rep.models.list()
    # Replicate's shows FAST's upscaling alias after it, as the upscaler it runs as.
    shown = [f"{m.owner}/{m.name}" for m in page.results]
    assert shown == [listed[0], "nightmareai/real-esrgan", *listed[1:]] and page.next is None
    alias = page.results[1]
    assert listed[0] == FAST and alias.description == "image upscaling served by Atelier"
    assert set(alias.latest_version.openapi_schema["components"]["schemas"]["Input"][
        "properties"]) == {"image", "scale", "face_enhance"}
    retrieved = oai.models.retrieve("black-forest-labs/flux-dev")  # an alias
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (FLUX, "model", "atelier")
    flux = page.results[-6]
    assert flux.latest_version.id == rep.models.get(FLUX).latest_version.id
    assert "prompt" in flux.latest_version.openapi_schema["components"]["schemas"]["Input"][
        "properties"]


def test_healthz_reports_every_model_ready(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    models = r.json()["models"]
    assert set(models) == {FAST, BATCHED, ONE_SLOT, TWO_REPLICAS, RESTARTABLE,
                           DEADLINE, SMALL_MEMORY, STALL, CHECKED, INPAINTING, AUTOSCALED,
                           FLUX, KONTEXT, FILL, CANNY, DEPTH, REDUX}
    assert all(m["state"] == "ready" for m in models.values())
    assert [models[m]["replicas_running"] for m in (FAST, TWO_REPLICAS)] == [1, 2]
    assert [models[m]["replicas_range"] for m in (FAST, TWO_REPLICAS)] == [[1, 1], [2, 2]]
    assert r.json()["store"] == {"kind": "memory", "state": "ok"}  # (no redis_url here)


def test_openapi_documents_the_generate_fields(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/generate"]["post"]
    assert {p["name"] for p in op["parameters"]} >= {"prompt", "width", "height", "steps", "seed"}
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    # A prompt may be left out only for a redux_image (a 422 on prompt otherwise).
    assert "prompt" not in schema.get("required", []) and "redux_image" in schema["properties"]
    assert "redux_image" in schema["properties"]["prompt"]["description"]
