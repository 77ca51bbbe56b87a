"""Long prompts and weighted words over HTTP, on the tiny SDXL that reads prompts in up to
two chunks with weights (TWO_REPLICAS) beside one that reads diffusers' 77 tokens (FAST)."""

import io

from PIL import Image

from tests.integration.conftest import FAST, TWO_REPLICAS, decode, pixels

# In the tiny tokenizer "the" and "on" are one token each.
LONG = " ".join(["the"] * 80 + ["on"] * 40)
CHANGED = " ".join(["the"] * 100 + ["on"] * 20)  # the same first 80 tokens
SETTINGS = {"width": 64, "height": 64, "guidance_scale": 7, "scheduler": "K_EULER"}


def _image(client, model: str, prompt: str, seed: int = 5):
    body = {"prompt": prompt, "model": model, "seed": seed, "steps": 3} | SETTINGS
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return pixels(decode(r.json()["image"]))


def test_models_list_how_they_read_prompts(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[TWO_REPLICAS]["prompts"] == {"chunks": 2, "weights": True,
                                                "comma_backtrack": 20, "clip_skip": 0}
    assert models[FAST]["prompts"] == {"chunks": 1, "weights": False, "comma_backtrack": 20,
                                       "clip_skip": 0}
    assert models["atelier/tiny-flux"]["prompts"] is None


def test_a_prompt_cut_short_is_said_in_the_answer_and_in_replicates_logs(client, rep):
    note = ("prompt: the model reads 75 of its 120 tokens (1 chunk(s) of 75); the rest "
            "was not read")
    body = {"prompt": LONG, "model": FAST, "seed": 5, "steps": 3} | SETTINGS
    assert client.post("/generate", json=body).json()["warnings"] == [note]
    read = client.post("/generate", json=body | {"model": TWO_REPLICAS}).json()
    assert "warnings" not in read and read["seed"] == 5
    prediction = rep.predictions.create(model=FAST, input={"prompt": LONG, "seed": 5,
                                                           "num_inference_steps": 3})
    prediction.wait()
    assert prediction.status == "succeeded" and note + "\n" in prediction.logs


def test_words_past_77_tokens_count_where_the_model_reads_them(client):
    assert (_image(client, FAST, LONG) == _image(client, FAST, CHANGED)).all()
    assert abs(_image(client, TWO_REPLICAS, LONG)
               - _image(client, TWO_REPLICAS, CHANGED)).mean() > 0.5


def test_weights_change_the_image_the_same_way_through_replicate(client, rep):
    """`(words:w)` is read on the weighing model alone; Replicate's input draws the
    same pixels as /generate."""
    weighted = _image(client, TWO_REPLICAS, "a (red cube:4)")
    assert abs(weighted - _image(client, TWO_REPLICAS, "a red cube")).mean() > 0.5
    literal = _image(client, FAST, "a (red cube:4)")
    assert abs(literal - _image(client, FAST, "a red cube")).mean() > 0.5
    (file,) = rep.run(TWO_REPLICAS, input={"prompt": "a (red cube:4)", "seed": 5,
                                           "num_inference_steps": 3} | SETTINGS)
    assert (pixels(Image.open(io.BytesIO(file.read()))) == weighted).all()
