"""Workload profiles: what one request of a kind of traffic looks like.

A profile turns (random generator, request number) into one `/generate` JSON body. The
open-loop driver (`load.run`) and the Locust file (`load/locustfile.py`) both draw their
requests from here, so the two tools send the same traffic.
"""

from __future__ import annotations

import base64
import functools
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# A few product shots and scenes for the variation mix; captions in the style of the
# COCO captions that MLPerf's SDXL benchmark prompts with.
PRODUCTS = ("a leather handbag", "a ceramic coffee mug", "a pair of running shoes",
            "a glass perfume bottle", "a wooden desk lamp", "a wool scarf")
SCENES = ("on a marble counter, soft morning light", "in a sunlit kitchen",
          "on a beach at sunset", "against a pastel studio backdrop",
          "on a rustic wooden table with plants")
CAPTIONS = ("A man riding a wave on top of a surfboard.",
            "A kitchen with wooden cabinets and a white refrigerator.",
            "Two giraffes standing next to each other in a field.",
            "A plate of food with broccoli and a piece of meat.",
            "A red double decker bus driving down a city street.",
            "A cat sitting on a laptop keyboard on a desk.",
            "A group of people flying kites on a grassy hill.",
            "A train traveling over a bridge near a river.")


@dataclass(frozen=True)
class Profile:
    """`body(rng, i, adapters)` makes request i; `adapters` are names the server offers."""

    name: str
    description: str
    body: Callable[[random.Random, int, Sequence[str]], dict]
    size: int
    steps: int
    slo_s: float


def _seed(rng: random.Random) -> int:
    return rng.randrange(2**31)


def _smoke(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    return {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": _seed(rng)}


@functools.cache
def product_photo(index: int) -> str:
    """A stand-in for a seller's upload of product `index`: an object on a plain backdrop,
    1024x1024, as a JPEG data URI (drawn here, the same every time)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(index)
    image = Image.new("RGB", (1024, 1024), tuple(rng.randrange(180, 250) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(30, 200) for _ in range(3))
    box = (rng.randrange(200, 360), rng.randrange(160, 320), rng.randrange(660, 820),
           rng.randrange(700, 880))
    draw.rounded_rectangle(box, radius=rng.randrange(20, 200), fill=colour)
    draw.ellipse((box[0], box[3] - 40, box[2], box[3] + 40), fill=(90, 90, 90))  # shadow
    image = image.filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _variations(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """A seller's product photo in five scenes (img2img): requests come in runs of five,
    one product each."""
    product = (i // 5) % len(PRODUCTS)
    scene = SCENES[i % 5]
    return {"prompt": f"product photo of {PRODUCTS[product]} {scene}", "width": 1024,
            "height": 1024, "steps": 25, "guidance_scale": 7.0, "seed": _seed(rng),
            "negative_prompt": "blurry, low quality, watermark, text",
            "image": product_photo(product), "prompt_strength": 0.75}


def _mlperf(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    return {"prompt": rng.choice(CAPTIONS), "width": 1024, "height": 1024, "steps": 20,
            "guidance_scale": 8.0, "scheduler": "K_EULER", "seed": _seed(rng)}


def _flux_dev(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Replicate's flux-dev defaults: 28 steps; guidance 3.5 as FLUX.1-dev's model card."""
    return {"prompt": rng.choice(CAPTIONS), "width": 1024, "height": 1024, "steps": 28,
            "guidance_scale": 3.5, "seed": _seed(rng)}


def _refiner(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Replicate's SDXL example input: the refiner takes the last fifth of the steps."""
    return {"prompt": rng.choice(CAPTIONS), "width": 1024, "height": 1024, "steps": 30,
            "guidance_scale": 7.5, "seed": _seed(rng), "refine": "expert_ensemble_refiner",
            "high_noise_frac": 0.8}


def _mixed_adapters(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """A third without an adapter; the rest pick adapters with a few popular ones
    (weights 1/rank), as styles are in practice."""
    body = {"prompt": rng.choice(CAPTIONS), "width": 1024, "height": 1024, "steps": 20,
            "seed": _seed(rng)}
    if adapters and rng.random() >= 1 / 3:
        weights = [1 / (rank + 1) for rank in range(len(adapters))]
        body["loras"] = [{"name": rng.choices(list(adapters), weights)[0]}]
    return body


def _image_prompts(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Captions, every other one steered by one of three mood boards of 1, 2 and 3
    product photos (drawn here, the same every time) through the model's IP-Adapter at
    0.6, as a brand's style references."""
    body = {"prompt": rng.choice(CAPTIONS), "width": 1024, "height": 1024, "steps": 20,
            "seed": _seed(rng)}
    if i % 2 == 0:
        board = (i // 2) % 3
        body |= {"ip_adapter_image": [product_photo(100 + 3 * board + k)
                                      for k in range(board + 1)],
                 "ip_adapter_scale": 0.6}
    return body


# Instructions a shop gives a FLUX.1 Kontext model for its product photos.
EDITS = ("put it on a marble counter in soft morning light",
         "make the backdrop a beach at sunset", "change its colour to deep blue",
         "place it in a sunlit kitchen", "add a sprig of eucalyptus beside it")


def _kontext_edits(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Product photos edited by instruction on a Kontext model: runs of five edits of one
    photo, as a seller makes a listing's pictures. Replicate's flux-kontext-dev defaults
    (28 steps, guidance 2.5)."""
    return {"prompt": EDITS[i % 5], "image": product_photo((i // 5) % len(PRODUCTS)),
            "width": 1024, "height": 1024, "steps": 28, "guidance_scale": 2.5,
            "seed": _seed(rng)}


@functools.cache
def banner_canvas(index: int) -> str:
    """Product `index`'s photo at 768x768 in the middle of a 1344x768 (16:9) canvas whose
    sides are transparent, as a PNG data URI: what a FLUX.1 Fill model outpaints."""
    from PIL import Image

    photo = Image.open(io.BytesIO(base64.b64decode(product_photo(index).split(",", 1)[1])))
    canvas = Image.new("RGBA", (1344, 768), (0, 0, 0, 0))
    canvas.paste(photo.resize((768, 768), Image.Resampling.LANCZOS), (288, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fill_banners(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Square product photos outpainted into 16:9 banners on a Fill model (the canvas's
    transparent sides are filled): runs of five scenes per photo. Replicate's flux-fill-dev
    defaults (28 steps, guidance 30)."""
    product = (i // 5) % len(PRODUCTS)
    return {"prompt": f"product photo of {PRODUCTS[product]} {SCENES[i % 5]}",
            "image": banner_canvas(product), "width": 1344, "height": 768, "steps": 28,
            "guidance_scale": 30.0, "seed": _seed(rng)}


def _redux_variations(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Product photos varied with FLUX.1 Redux, no prompt: runs of five variations of one
    photo, as a shop fills a listing. Replicate's flux-redux-dev defaults (28 steps,
    guidance 3)."""
    return {"redux_image": product_photo((i // 5) % len(PRODUCTS)), "width": 1024,
            "height": 1024, "steps": 28, "guidance_scale": 3.0, "seed": _seed(rng)}


def _flux_controlnet(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Product photos redrawn in five scenes by a FLUX model whose `canny` ControlNet keeps
    each photo's outline (the server finds its edges), at 0.5 as InstantX's examples run
    their Union; FLUX.1-dev's 28 steps, guidance 3.5."""
    product = (i // 5) % len(PRODUCTS)
    return {"prompt": f"product photo of {PRODUCTS[product]} {SCENES[i % 5]}",
            "control_image": product_photo(product), "controlnet": "canny",
            "controlnet_conditioning_scale": 0.5, "width": 1024, "height": 1024, "steps": 28,
            "guidance_scale": 3.5, "seed": _seed(rng)}


@functools.cache
def label_mask() -> str:
    """A mask over the middle of a product photo, where its label sits: a white 192x128
    box on black, 1024x1024, as a PNG data URI."""
    from PIL import Image

    mask = Image.new("L", (1024, 1024))
    mask.paste(255, (416, 448, 608, 576))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _retouch(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Product photos retouched: the label area of each repainted at the model's full size
    and laid back into the photo (inpainting only the masked area, 32 pixels around it),
    five versions per photo; strength 0.75, 25 steps."""
    product = (i // 5) % len(PRODUCTS)
    return {"prompt": f"a clean printed label on {PRODUCTS[product]}",
            "image": product_photo(product), "mask": label_mask(), "padding_mask_crop": 32,
            "width": 1024, "height": 1024, "steps": 25, "prompt_strength": 0.75,
            "seed": _seed(rng)}


def _upscale(rng: random.Random, i: int, adapters: Sequence[str]) -> dict:
    """Sellers' product photos enlarged 4x, not redrawn (strength 0: the model's first
    upscaler alone, as Replicate's real-esrgan at its default scale)."""
    return {"prompt": "x", "image": product_photo(i % len(PRODUCTS)), "prompt_strength": 0,
            "upscale": 4, "seed": _seed(rng)}


PROFILES = {p.name: p for p in (
    Profile("smoke", "64x64, 2 steps: checks the tool and the server end to end (CI)",
            _smoke, 64, 2, slo_s=5.0),
    Profile("product-variations", "one product photo in five scenes (img2img, strength "
            "0.75), 1024x1024, 25 steps",
            _variations, 1024, 25, slo_s=20.0),
    Profile("mlperf", "MLPerf-like SDXL: captions, 1024x1024, 20 steps, guidance 8",
            _mlperf, 1024, 20, slo_s=20.0),
    Profile("flux-dev", "captions for a FLUX.1-dev model, 1024x1024, 28 steps, guidance 3.5",
            _flux_dev, 1024, 28, slo_s=60.0),
    Profile("refiner", "captions with the SDXL refiner on the last 20 % of the steps "
            "(expert_ensemble_refiner), 1024x1024, 30 steps", _refiner, 1024, 30, slo_s=30.0),
    Profile("mixed-adapters", "captions with a popular-first mix of LoRA adapters (the "
            "server's catalog, or --adapters names and file URLs), 1024x1024, 20 steps",
            _mixed_adapters, 1024, 20, slo_s=20.0),
    Profile("image-prompts", "captions, every other one with one of three mood boards (1, "
            "2 and 3 photos) as its image prompt (IP-Adapter, scale 0.6), 1024x1024, 20 steps",
            _image_prompts, 1024, 20, slo_s=20.0),
    Profile("kontext-edits", "product photos edited by instruction on a FLUX.1 Kontext "
            "model, five edits per photo, 1024x1024, 28 steps, guidance 2.5",
            _kontext_edits, 1024, 28, slo_s=90.0),
    Profile("fill-banners", "square product photos outpainted into 16:9 banners on a FLUX.1 "
            "Fill model (the transparent sides drawn), 1344x768, 28 steps, guidance 30",
            _fill_banners, 1024, 28, slo_s=90.0),
    Profile("redux-variations", "product photos varied by a FLUX model with FLUX.1 Redux (no "
            "prompt), five variations per photo, 1024x1024, 28 steps, guidance 3",
            _redux_variations, 1024, 28, slo_s=60.0),
    Profile("flux-controlnet", "product photos redrawn in five scenes by a FLUX model along "
            "their edges (its canny ControlNet at 0.5), 1024x1024, 28 steps, guidance 3.5",
            _flux_controlnet, 1024, 28, slo_s=60.0),
    Profile("retouch", "the label area of product photos repainted at 1024x1024 and laid "
            "back (inpainting only the masked area), five per photo, 25 steps",
            _retouch, 1024, 25, slo_s=20.0),
    Profile("upscale", "product photos of 1024x1024 enlarged 4x by the model's first upscaler, "
            "not redrawn (prompt strength 0)", _upscale, 1024, 0, slo_s=20.0),
)}


def sized(body: dict, size: int | None, steps: int | None) -> dict:
    """The body with width/height and steps overridden (to run a profile on a small model)."""
    out = dict(body)
    if size is not None:
        out["width"] = out["height"] = size
    if steps is not None:
        out["steps"] = steps
    return out
