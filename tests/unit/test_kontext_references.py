"""Kontext edits reading further reference images (CPU, the embedded tiny Kontext): each
is sized at the output's area in its own shape, encoded as diffusers' Kontext pipeline
encodes its one reference, and its tokens join the edit's on every step, laid beside the
references before on their plane of position ids."""

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.engines.kontext import reference_offsets
from serve.errors import InvalidField
from serve.source_images import source_image
from serve.types import GenerationRequest
from tests.pictures import png_bytes
from tests.unit.test_engine import assert_same_pixels, withdrawing
from tests.unit.test_kontext import (  # noqa: F401 (engine, kontext_path, reference: fixtures)
    MODEL,
    OTHER,
    PHOTO,
    _px,
    engine,
    kontext_path,
    reference,
)

RNG = np.random.default_rng(11)
TALL = RNG.integers(0, 256, (120, 40, 3), dtype=np.uint8)  # 40 wide, 120 high


def _edit(pixels, references=(), prompt="put the vase on the table", **overrides):
    source, width, height = source_image(png_bytes(pixels), None, 0.8, None, None, MODEL,
                                         references=[png_bytes(r) for r in references])
    return GenerationRequest.for_model(MODEL, prompt, width=width, height=height,
                                       source=source, **{"seed": 5, **overrides})


def test_references_are_laid_below_or_beside_the_ones_before_as_comfyui_lays_them():
    assert reference_offsets([(4, 7)]) == [(0, 0)]
    # Wide ones go below each other; a tall one then goes to their right.
    assert reference_offsets([(4, 7), (4, 7), (6, 2)]) == [(0, 0), (4, 0), (0, 7)]
    assert reference_offsets([(8, 4), (8, 4)]) == [(0, 0), (0, 4)]


def test_a_further_reference_keeps_its_shape_at_the_outputs_area():
    request = _edit(PHOTO, [TALL])
    assert (request.width, request.height) == (112, 64)  # the edited image's, as without
    (ref,) = request.source.references
    # 112 x 64 = 7168 pixels at 1:3: 48.9 x 146.6, each down to a multiple of 16.
    assert (ref.width, ref.height) == (48, 144)
    assert ref.rgb == Image.fromarray(TALL).resize((48, 144), Image.Resampling.LANCZOS).tobytes()
    assert request.batch_key != _edit(PHOTO).batch_key
    assert request.batch_key == _edit(OTHER, [TALL[::-1]], seed=9).batch_key


@pytest.mark.parametrize("model, mask, count, field, words", [
    (MODEL.model_copy(update={"kontext": False, "embedded": "tiny-flux"}), None, 1,
     "reference_images", "only Kontext"),
    (MODEL, np.full((64, 96), 255, np.uint8), 1, "reference_images", "masked edit"),
    (MODEL, None, 4, "reference_images.3", "at most 4"),
])
def test_references_are_refused_where_they_cannot_be_read(model, mask, count, field, words):
    with pytest.raises(InvalidField) as err:
        source_image(png_bytes(PHOTO), None if mask is None else png_bytes(mask), 0.8, None, None,
                     model, references=[png_bytes(TALL)] * count)
    assert err.value.field == field and words in err.value.reason
    with pytest.raises(InvalidField, match="need an image"):
        source_image(None, None, 0.8, None, None, MODEL, references=[png_bytes(TALL)])


def test_each_step_reads_a_further_references_own_latents_beside_the_ones_before(
        engine, reference):  # noqa: F811
    """Its tokens are those diffusers' Kontext pipeline makes of it as its one reference,
    on the references' plane (first id 1), to the right of the edited image's 7 x 4."""
    request = _edit(PHOTO, [TALL])
    seen = []
    out, _ = withdrawing(engine, [request], None, engine.pipe.transformer,
                         lambda args, kwargs: seen.append(
                             (kwargs["hidden_states"].clone(), kwargs["img_ids"].clone())))
    hidden, ids = seen[0]
    own, first, further = 7 * 4, 7 * 4, 3 * 9  # 112x64 and 48x144 in 16-pixel patches
    assert len(seen) == request.num_inference_steps
    assert hidden.shape[1] == own + first + further and ids.shape[0] == hidden.shape[1]
    ref = request.source.references[0]
    picture = Image.frombytes("RGB", (ref.width, ref.height), ref.rgb)
    image = reference.image_processor.preprocess(picture, ref.height, ref.width)
    latents, their_ids = reference.prepare_latents(
        image, 1, 16, ref.height, ref.width, torch.float32, torch.device("cpu"),
        [torch.Generator().manual_seed(0)])[1::2]
    torch.testing.assert_close(hidden[0, own + first:], latents[0], rtol=1e-5, atol=1e-5)
    # The edited image's plane starts at (0, 0): (row 0, column 7) starts the next.
    assert torch.equal(ids[own + first:], their_ids + torch.tensor([0.0, 0.0, 7.0]))
    assert (ids[own:, 0] == 1).all() and (ids[:own, 0] == 0).all()
    (alone,), = engine.generate([_edit(PHOTO)])
    # The reference is read (the tiny random model attends to it weakly: 0.21 levels on
    # average when written).
    assert np.abs(_px(out[0][0]) - _px(alone)).mean() > 0.1


def test_edits_with_references_batch_and_keep_each_images_pixels(engine):  # noqa: F811
    a = _edit(PHOTO, [TALL])
    b = _edit(OTHER, [TALL[::-1]], seed=9, num_outputs=2)
    together = engine.generate([a, b])
    alone = [engine.generate([r])[0] for r in (a, b)]
    assert [len(images) for images in together] == [1, 2]
    for ours, solo in zip(together, alone, strict=True):
        for x, y in zip(ours, solo, strict=True):
            assert_same_pixels(x, y)


def test_an_edit_with_further_references_runs_uncompiled_beside_static_compiled_code(
        kontext_path, engine, compile_cache):  # noqa: F811
    """Compiled for exact shapes, a call with further references (more tokens per row)
    compiles nothing under load: it runs uncompiled, with the plain engine's pixels."""
    from torch._dynamo.utils import counters

    from deployments.engines.flux import FluxKontextEngine
    from serve.config import SpeedConfig

    compiled = FluxKontextEngine(kontext_path, "float32", "cpu", compile_cache=compile_cache,
                                 speed=SpeedConfig(compile=True, batch_buckets=[1]))
    request = _edit(PHOTO, [TALL])
    compiled.warm_up(GenerationRequest.for_model(MODEL, "warm-up", seed=0,
                                                 width=request.width, height=request.height,
                                                 num_inference_steps=1))
    warmed = counters["stats"]["calls_captured"]
    (images,), = compiled.generate([request])
    assert counters["stats"]["calls_captured"] == warmed  # nothing compiled under load
    (plain,), = engine.generate([request])
    assert np.abs(_px(images) - _px(plain)).max() <= 2


def test_replicates_kontext_input_names_the_edited_image_and_the_further_ones():
    """flux-kontext-dev's input_image, or multi-image-kontext's input_image_1; the further
    ones as flux-kontext-max names them; each error names the field that was sent."""
    from pydantic import ValidationError

    from serve.routes.replicate_flux import KontextInput

    inp = KontextInput.model_validate({"prompt": "x", "input_image_1": "a",
                                       "input_image_2": "b", "input_image_4": "d",
                                       "safety_tolerance": 2})
    assert inp.image == "a" and inp.references() == ["b", "d"]
    wide = KontextInput.model_validate({"prompt": "x", "aspect_ratio": "2:1"}).request_args()
    assert (wide["width"], wide["height"]) == (1408, 704)
    assert [inp.field_of(f) for f in ("image", "width", "reference_images",
                                      "reference_images.1")] == [
        "input_image_1", "input_image_1", "input_image_2", "input_image_4"]
    plain = KontextInput.model_validate({"prompt": "x", "input_image": "a"})
    assert plain.image == "a" and plain.references() == [] and plain.field_of("image") == (
        "input_image")
    with pytest.raises(ValidationError, match="not both"):
        KontextInput.model_validate({"prompt": "x", "input_image": "a", "input_image_1": "b"})
