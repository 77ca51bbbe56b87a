"""The official `replicate` client against the running app."""

import base64
import hashlib
import io
import time

import httpx
import pytest
from PIL import Image
from replicate.exceptions import ReplicateError

from tests.integration.conftest import (
    API_KEY,
    AUTH,
    BATCHED,
    ESRGAN_VERSION,
    FAST,
    FLUX,
    INPAINTING,
    KONTEXT,
    SDXL_VERSION,
    assert_same_pixels,
    decode,
    pixels,
)


def _png(url):
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return r.content


def test_run_returns_png_files_of_the_requested_size(rep):
    output = rep.run(FAST, input={"prompt": "a red cube", "width": 128, "height": 64,
                                  "num_outputs": 2, "seed": 5})
    assert len(output) == 2
    # run() waits (Prefer: wait), so the files come inline as data URIs.
    assert all(f.url.startswith("data:image/png;base64,") for f in output)
    sizes = [Image.open(io.BytesIO(f.read())).size for f in output]
    assert sizes == [(128, 64), (128, 64)]


def test_run_matches_generate_for_the_same_seed(rep, client):
    (file,) = rep.run(FAST, input={"prompt": "a cat", "seed": 42})
    direct = client.post("/generate", json={"prompt": "a cat", "seed": 42}).json()["image"]
    replicated = Image.open(io.BytesIO(file.read()))
    assert (pixels(decode(direct)) == pixels(replicated)).all()


def test_replicates_own_sdxl_example_input_is_served_with_the_refiner(rep, client):
    """The input of stability-ai/sdxl's API example, refiner and all."""
    example = {"prompt": "An astronaut riding a rainbow unicorn, cinematic, dramatic",
               "width": 128, "height": 128, "refine": "expert_ensemble_refiner",
               "scheduler": "K_EULER", "lora_scale": 0.6, "num_outputs": 1,
               "guidance_scale": 7.5, "apply_watermark": False, "high_noise_frac": 0.8,
               "negative_prompt": "", "prompt_strength": 0.8, "num_inference_steps": 10,
               "seed": 4}
    (file,) = rep.run(FAST, input=example)
    body = {"prompt": example["prompt"], "width": 128, "height": 128, "steps": 10,
            "guidance_scale": 7.5, "seed": 4}
    refined = client.post("/generate", json={**body, "refine": "expert_ensemble_refiner"})
    plain = client.post("/generate", json=body)
    replicated = pixels(Image.open(io.BytesIO(file.read())))
    assert (replicated == pixels(decode(refined.json()["image"]))).all()
    assert abs(replicated - pixels(decode(plain.json()["image"]))).mean() > 0.1


def test_sdxl_lightnings_input_is_served_unguided_with_its_sde_scheduler(rep, client):
    """bytedance/sdxl-lightning-4step's example input (its DPM++2MSDE scheduler, 4 steps,
    guidance 0): the pixels /generate draws for the same settings."""
    example = {"prompt": "self-portrait of a woman, lightning in the background",
               "negative_prompt": "worst quality, low quality", "width": 64, "height": 64,
               "num_outputs": 1, "scheduler": "DPM++2MSDE", "num_inference_steps": 4,
               "guidance_scale": 0, "seed": 8, "disable_safety_checker": False}
    (file,) = rep.run(FAST, input=example)
    body = {"prompt": example["prompt"], "negative_prompt": example["negative_prompt"],
            "steps": 4, "guidance_scale": 0, "seed": 8, "scheduler": "DPM++2MSDE"}
    direct = client.post("/generate", json=body).json()["image"]
    euler = client.post("/generate", json=body | {"scheduler": "K_EULER"}).json()["image"]
    replicated = pixels(Image.open(io.BytesIO(file.read())))
    assert (replicated == pixels(decode(direct))).all()
    assert abs(replicated - pixels(decode(euler))).mean() > 0.1


def test_guidance_rescale_is_taken_as_on_generate_and_draws_its_own_image(rep, client):
    """A v-prediction fine-tune's setting, on the plain tiny SDXL: the same pixels through
    both APIs, another image than without it."""
    body = {"prompt": "a lighthouse at dusk", "steps": 3, "guidance_scale": 9, "seed": 12}
    (file,) = rep.run(FAST, input={"prompt": body["prompt"], "num_inference_steps": 3,
                                   "guidance_scale": 9, "seed": 12, "guidance_rescale": 0.7})
    rescaled = client.post("/generate", json=body | {"guidance_rescale": 0.7}).json()["image"]
    plain = client.post("/generate", json=body).json()["image"]
    replicated = pixels(Image.open(io.BytesIO(file.read())))
    assert (replicated == pixels(decode(rescaled))).all()
    assert abs(replicated - pixels(decode(plain))).mean() > 0.1


@pytest.mark.parametrize("inp, field, reason", [
    ({"refine": "base_image_refiner"}, "input.refine", "has no refiner"),
    ({"guidance_rescale": 1.5}, "input.guidance_rescale", "less than or equal to 1"),
    ({"replicate_weights": "https://replicate.delivery/x/trained.tar"},
     "input.replicate_weights", "give lora_weights"),
])
def test_refining_without_a_refiner_and_trained_weight_archives_are_422(base_url, inp, field,
                                                                        reason):
    r = httpx.post(f"{base_url}/v1/models/{BATCHED}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", **inp}})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == field
    assert reason in r.text


def test_a_waited_create_inlines_the_files_the_stored_prediction_links(base_url):
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers={**AUTH, "Prefer": "wait"},
                   json={"input": {"prompt": "a cat", "seed": 8, "output_format": "webp"}},
                   timeout=70)
    assert r.status_code == 201 and r.json()["status"] == "succeeded"
    (inline,) = r.json()["output"]
    head, _, data = inline.partition(",")
    assert head == "data:image/webp;base64"
    (url,) = httpx.get(r.json()["urls"]["get"], headers=AUTH).json()["output"]
    assert url.startswith(f"{base_url}/files/") and url.endswith(".webp")
    assert httpx.get(url).content == base64.b64decode(data)


def test_create_wait_get_by_version(rep):
    model = rep.models.get(FAST)
    version = model.latest_version
    assert len(version.id) == 64
    assert "prompt" in version.openapi_schema["components"]["schemas"]["Input"]["properties"]
    assert [v.id for v in model.versions.list()] == [version.id]
    assert model.versions.get(version.id).openapi_schema == version.openapi_schema
    prediction = rep.predictions.create(version=version.id, input={"prompt": "x", "seed": 1})
    assert prediction.status in ("starting", "processing")
    prediction.wait()
    assert prediction.status == "succeeded" and prediction.version == version.id
    again = rep.predictions.get(prediction.id)
    assert again.output == prediction.output and again.metrics["predict_time"] > 0
    assert "Using seed: 1" in again.logs
    # The input as sent, as Replicate echoes it: none of the defaults the run took.
    assert prediction.input == again.input == {"prompt": "x", "seed": 1}
    assert again.id in [p.id for p in rep.predictions.list()]


def test_search_finds_the_served_models_by_name_kind_and_alias(rep):
    def ids(query):
        return [f"{m.owner}/{m.name}" for m in rep.models.search(query).results]

    assert ids("flux kontext") == [KONTEXT]
    assert ids("dall-e-3") == [FAST]  # by its alias
    assert ids("real-esrgan") == ["nightmareai/real-esrgan"]  # as the upscaler it runs as
    assert ids("inpainting") == [INPAINTING]
    assert ids("no such model") == []
    assert FLUX in ids("flux") and FAST not in ids("flux")


def test_the_version_pins_the_model(rep):
    with pytest.raises(ReplicateError):
        rep.predictions.create(version=f"{FAST}:{'0' * 64}", input={"prompt": "x"})
    # A version pinned to the model's upscaling alias does not run it as its SDXL.
    with pytest.raises(ReplicateError) as other:
        rep.predictions.create(version=f"stability-ai/sdxl:{ESRGAN_VERSION}",
                               input={"prompt": "x"})
    assert other.value.status == 422


def test_code_pinned_to_replicates_own_versions_runs_unchanged(rep):
    inp = {"prompt": "a red cube", "seed": 5, "num_inference_steps": 3}
    (pinned,) = rep.run(f"stability-ai/sdxl:{SDXL_VERSION}", input=inp)  # a bare version id
    (served,) = rep.run(FAST, input=inp)
    assert_same_pixels(Image.open(io.BytesIO(pinned.read())),
                       Image.open(io.BytesIO(served.read())))
    prediction = rep.predictions.create(version=SDXL_VERSION, input=inp)
    prediction.wait()
    # It reports what ran: the model and the version served here.
    assert prediction.status == "succeeded" and prediction.model == FAST
    assert prediction.version == rep.models.get(FAST).latest_version.id != SDXL_VERSION
    version = rep.models.get("stability-ai/sdxl").versions.get(SDXL_VERSION)
    assert version.id == SDXL_VERSION and "prompt" in version.openapi_schema["components"][
        "schemas"]["Input"]["properties"]
    upscaler = rep.models.get("nightmareai/real-esrgan").versions.get(ESRGAN_VERSION)
    assert "scale" in upscaler.openapi_schema["components"]["schemas"]["Input"]["properties"]


def test_cancel_ends_queued_and_running_predictions_while_others_finish(rep):
    # The batched model waits 2 s for company, so these are all still pending.
    preds = [rep.models.predictions.create(model=BATCHED, input={"prompt": "x", "seed": s})
             for s in range(3)]
    time.sleep(0.3)
    rep.predictions.cancel(preds[1].id)
    for p in preds:
        p.wait()
    assert [p.status for p in preds] == ["succeeded", "canceled", "succeeded"]
    assert preds[1].output is None and len(preds[0].output) == 1


def test_canceling_one_running_prediction_of_a_batch_leaves_the_others_their_pixels(rep,
                                                                                   client):
    def inp(seed):
        return {"prompt": "a lamp", "seed": seed, "width": 256, "height": 256,
                "num_inference_steps": 20}

    preds = [rep.models.predictions.create(model=BATCHED, input=inp(s)) for s in (11, 12, 13)]
    deadline = time.monotonic() + 60
    while "/20" not in (preds[1].logs or "") and time.monotonic() < deadline:
        time.sleep(0.05)
        preds[1].reload()
    assert "20/20" not in preds[1].logs  # cancelled while its pipeline call runs
    rep.predictions.cancel(preds[1].id)
    for p in preds:
        p.wait()
    assert [p.status for p in preds] == ["succeeded", "canceled", "succeeded"]
    for p, seed in ((preds[0], 11), (preds[2], 13)):
        alone = client.post("/generate", json={"model": FAST, "prompt": "a lamp", "seed": seed,
                                               "width": 256, "height": 256, "steps": 20})
        batched = Image.open(io.BytesIO(_png(str(p.output[0]))))
        assert_same_pixels(batched, decode(alone.json()["image"]))


def test_invalid_input_is_422_naming_each_field(base_url):
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH,
                   json={"input": {"prompt": "x", "width": "wide", "colour": "red"}})
    assert r.status_code == 422
    fields = {f["field"] for f in r.json()["invalid_fields"]}
    assert fields == {"input.width", "input.colour"}


@pytest.mark.parametrize("inp, field", [({"prompt": "x", "width": 65}, "input.width"),
                                        ({"prompt": "x", "lora_weights": "nope"}, None)])
def test_model_limits_and_adapters_are_checked_before_running(base_url, inp, field):
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", headers=AUTH, json={"input": inp})
    if field:
        assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == field
    else:
        assert r.status_code == 404 and r.json()["status"] == 404


def test_lora_weights_input_applies_the_adapter(rep):
    (base,) = rep.run(FAST, input={"prompt": "a cat", "seed": 3})
    (styled,) = rep.run(FAST, input={"prompt": "a cat", "seed": 3, "lora_weights": "sketch",
                                     "lora_scale": 1.0})
    assert base.read() != styled.read()


def test_unknown_prediction_is_404(rep):
    with pytest.raises(ReplicateError) as err:
        rep.predictions.get("doesnotexist")
    assert err.value.status == 404


def test_canceling_a_running_prediction_stops_its_pipeline_call_early(rep, client):
    slow = {"prompt": "x", "seed": 2, "width": 256, "height": 256, "num_inference_steps": 60}
    full = client.post("/generate", json={"prompt": "x", "seed": 2, "width": 256,
                                          "height": 256, "steps": 60})
    full_ms = float(full.headers["x-atelier-inference-ms"])
    running = rep.models.predictions.create(model=FAST, input=slow)
    time.sleep(0.05 + full_ms / 8000)  # well inside its call
    rep.predictions.cancel(running.id)
    after = client.post("/generate", json={"prompt": "y", "seed": 1})
    # The next request waited only for the interrupted call's current step, not its rest.
    assert float(after.headers["x-atelier-queue-ms"]) < full_ms / 2
    running.reload()
    assert running.status == "canceled" and running.output is None


def test_logs_show_step_progress_while_the_prediction_runs(rep):
    p = rep.models.predictions.create(model=FAST, input={
        "prompt": "x", "seed": 4, "width": 256, "height": 256, "num_inference_steps": 40})
    mid_run = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p.reload()
        if p.status == "processing" and "/40" in (p.logs or "") and "40/40" not in p.logs:
            mid_run = p.logs
        if p.status == "succeeded":
            break
        time.sleep(0.05)
    assert mid_run is not None and mid_run.startswith("Using seed: 4\n")
    assert "| 40/40" in p.logs and "100%|" in p.logs and p.started_at is not None


def _deadline_run(base_url, model, inp, cancel_after):
    r = httpx.post(f"{base_url}/v1/models/{model}/predictions", json={"input": inp},
                   headers={**AUTH, "Cancel-After": cancel_after, "Prefer": "wait=10"})
    assert r.status_code == 201, r.text
    return r.json()


def test_a_deadline_before_the_start_aborts_the_prediction(base_url):
    # The batched model waits 2 s for company: the 500 ms deadline comes first.
    body = _deadline_run(base_url, BATCHED, {"prompt": "x", "seed": 1}, "500ms")
    assert body["status"] == "aborted" and body["output"] is None
    assert 0.4 < body["metrics"]["total_time"] < 1.5


def test_a_deadline_while_running_cancels_the_prediction(base_url):
    slow = {"prompt": "x", "seed": 2, "width": 256, "height": 256, "num_inference_steps": 60}
    body = _deadline_run(base_url, FAST, slow, "0.8s")
    assert body["status"] == "canceled" and body["output"] is None
    assert body["started_at"] is not None and "/60" in body["logs"]


@pytest.mark.parametrize("value", ["soon", "-5", "0", "25h", "1x"])
def test_a_bad_deadline_is_422(base_url, value):
    r = httpx.post(f"{base_url}/v1/models/{FAST}/predictions", json={"input": {"prompt": "x"}},
                   headers={**AUTH, "Cancel-After": value})
    assert r.status_code == 422 and r.json()["invalid_fields"][0]["field"] == "Cancel-After"


def test_a_deployment_is_a_model_by_alias_with_its_version_as_the_release(rep):
    deployment = rep.deployments.get("stability-ai/sdxl")  # an alias of FAST
    release = deployment.current_release
    assert (deployment.owner, deployment.name) == ("stability-ai", "sdxl")
    assert release.model == FAST and release.version == rep.models.get(FAST).latest_version.id
    assert release.configuration.min_instances == 1
    inp = {"prompt": "a red cube", "seed": 17, "width": 64, "height": 64,
           "num_inference_steps": 4}
    via_deployment = deployment.predictions.create(input=inp)
    via_shortcut = rep.deployments.predictions.create("stability-ai/sdxl", input=inp)
    via_model = rep.predictions.create(model=FAST, input=inp)
    for p in (via_deployment, via_shortcut, via_model):
        p.wait()
        assert p.status == "succeeded" and p.version == release.version
    images = [Image.open(io.BytesIO(_png(p.output[0])))
              for p in (via_deployment, via_shortcut, via_model)]
    assert_same_pixels(images[0], images[2])
    assert_same_pixels(images[1], images[2])
    assert {d.id for d in rep.deployments.list()} >= {FAST, "atelier/tiny-flux"}


def test_deployments_are_made_by_the_config_not_the_api(rep):
    with pytest.raises(ReplicateError) as made:
        rep.deployments.create(name="x", model=FAST, version="v", hardware="gpu-h100",
                               min_instances=1, max_instances=1)
    assert made.value.status == 405 and "alias" in made.value.detail
    with pytest.raises(ReplicateError) as removed:
        rep.deployments.delete("stability-ai", "sdxl")
    assert removed.value.status == 405
    with pytest.raises(ReplicateError) as missing:
        rep.deployments.get("acme/none")
    assert missing.value.status == 404
    # The account is the key's name; a key without one is known by a hash of it.
    unnamed = "key-" + hashlib.sha256(API_KEY.encode()).hexdigest()[:8]
    assert rep.accounts.current().username == unnamed
