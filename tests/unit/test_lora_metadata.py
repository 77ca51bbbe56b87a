"""LoRA files whose alphas live in diffusers' safetensors metadata (`lora_adapter_metadata`,
the PEFT LoraConfig of each model), as diffusers' `save_lora_weights` writes them, on the
tiny SDXL and FLUX models. Diffusers' own `load_lora_weights` is the reference; the same tensors
without the metadata show that it is read."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deployments.lora_scales import file_scalings
from serve.adapters import AdapterCatalog, AdapterInvalid, AdapterSet
from serve.types import GenerationRequest
from tests.lora_files import (
    TE_TARGETS,
    UNET_TARGETS,
    lora_config,
    random_lora,
    save_lora,
)
from tests.unit.test_text_adapters import REQUEST, _diffusers, _embeds, _engine, _req

# Each model's LoraConfig options: alphas ≠ ranks, patterns per layer, rank-stabilised.
UNET = {"lora_alpha": 8, "alpha_pattern": {"to_k": 2}, "rank_pattern": {"to_v": 2}}
TE1 = {"lora_alpha": 6, "use_rslora": True}
TE2 = {"lora_alpha": 1, "alpha_pattern": {"fc2": 12}, "rank_pattern": {"fc1": 2}}


@pytest.fixture(scope="module")
def folder(tiny_sdxl_path, tmp_path_factory):
    """"tuned" (UNet and both encoders, metadata as above) and "bare" (the same tensors,
    no metadata)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    parts = {}
    for seed, (prefix, model, targets, options) in enumerate((
            ("unet", pipe.unet, UNET_TARGETS, UNET),
            ("text_encoder", pipe.text_encoder, TE_TARGETS, TE1),
            ("text_encoder_2", pipe.text_encoder_2, TE_TARGETS, TE2))):
        parts[prefix] = (random_lora(model, targets, 50 + seed, **options),
                         lora_config(targets, **options))
    out = tmp_path_factory.mktemp("metadata-loras")
    save_lora(out, "tuned", parts)
    save_lora(out, "bare", parts, metadata=False)
    return out


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, folder):
    return _engine(tiny_sdxl_path, folder)


def test_each_layers_factor_follows_the_metadata(engine):
    weights = engine.adapters.read("tuned")
    factors = {path.rsplit(".", 1)[-1]: factor
               for path, (_, _, factor) in weights.layers.items()
               if path.startswith("down_blocks.1.attentions.0.transformer_blocks.0.attn1.")}
    assert factors == {"to_q": 8 / 4, "to_k": 2 / 4, "to_v": 8 / 2, "0": 8 / 4}
    te1 = {path.rsplit(".", 1)[-1]: factor
           for path, (_, _, factor) in weights.text["text_encoder"].items()
           if ".layers.0." in path}
    assert te1 == pytest.approx(dict.fromkeys(TE_TARGETS, 6 / 2))  # 6/√4
    te2 = {path.rsplit(".", 1)[-1]: (a.shape[0], factor)
           for path, (a, _, factor) in weights.text["text_encoder_2"].items()
           if ".layers.0." in path}
    assert te2 == {"q_proj": (4, 1 / 4), "k_proj": (4, 1 / 4), "v_proj": (4, 1 / 4),
                   "out_proj": (4, 1 / 4), "fc1": (2, 1 / 2), "fc2": (4, 12 / 4)}
    bare = engine.adapters.read("bare")
    assert {factor for _, _, factor in bare.layers.values()} == {1.0}


def test_embeddings_and_pixels_are_those_of_diffusers_own_loading(engine, folder,
                                                                  tiny_sdxl_path):
    ours, _ = _embeds(engine, _req([("tuned", 0.7)]))
    bare, _ = _embeds(engine, _req([("bare", 0.7)]))
    pipe = _diffusers(tiny_sdxl_path, folder, "tuned", 0.7)
    theirs = pipe.encode_prompt(prompt=REQUEST["prompt"], device="cpu",
                                num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=REQUEST["negative_prompt"])
    for a, b, c in zip(ours, theirs, bare, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (a - c).abs().max() > 1e-3  # the metadata changes every embedding
    (images,) = engine.generate([_req([("tuned", 0.7)])])
    (bare_images,) = engine.generate([_req([("bare", 0.7)])])
    reference = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                     width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
                     generator=[torch.Generator("cpu").manual_seed(5)]).images[0]
    ours_px, bare_px = (np.asarray(i[0]).astype(int) for i in (images, bare_images))
    assert np.abs(ours_px - np.asarray(reference).astype(int)).max() <= 1
    assert np.abs(ours_px - bare_px).mean() > 1


def test_a_flux_adapters_metadata_alphas_give_diffusers_own_pixels(tiny_flux_path, tmp_path):
    from diffusers import FluxPipeline

    from deployments.engines.flux import FluxEngine
    from tests.unit.test_flux_adapters import REQUEST as FLUX_REQUEST
    from tests.unit.test_flux_adapters import _diffusers_image

    pipe = FluxPipeline.from_pretrained(tiny_flux_path, local_files_only=True)
    targets, options = ["to_q", "to_k", "to_v"], {"lora_alpha": 32, "alpha_pattern": {"to_k": 1}}
    parts = {"transformer": (random_lora(pipe.transformer, targets, 61, **options),
                             lora_config(targets, **options))}
    save_lora(tmp_path, "glow", parts, pipeline=FluxPipeline)
    save_lora(tmp_path, "glow-bare", parts, metadata=False, pipeline=FluxPipeline)
    catalog = AdapterCatalog.scan([(tmp_path, "flux", 1.0)]).entries
    engine = FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog, max_adapters=2,
                        max_lora_rank=4, lora_targets=targets)

    def image(name):
        request = GenerationRequest(**FLUX_REQUEST, adapters=AdapterSet.of([(name, 1.0)]))
        return np.asarray(engine.generate([request])[0][0]).astype(int)

    ours = image("glow")
    assert np.array_equal(ours, _diffusers_image(tiny_flux_path, tmp_path / "glow.safetensors"))
    assert np.abs(ours - image("glow-bare")).mean() > 1


def test_dora_adapters_are_refused_with_or_without_metadata(tiny_sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    state = random_lora(pipe.unet, UNET_TARGETS, 7, use_dora=True)
    assert any("lora_magnitude_vector" in k for k in state)
    parts = {"unet": (state, lora_config(UNET_TARGETS, use_dora=True))}
    save_lora(tmp_path, "dora", parts)
    save_lora(tmp_path, "dora-bare", parts, metadata=False)
    engine = _engine(tiny_sdxl_path, tmp_path)
    with pytest.raises(AdapterInvalid, match=r"adapter 'dora' \(unet\) uses DoRA"):
        engine.adapters.read("dora")
    with pytest.raises(AdapterInvalid, match="lora_magnitude_vector, which is not a plain"):
        engine.adapters.read("dora-bare")


def _with_metadata(folder, tmp_path, raw):
    """The "tuned" tensors in a file whose `lora_adapter_metadata` is `raw`."""
    path = tmp_path / "edited.safetensors"
    save_file(load_file(folder / "tuned.safetensors"), str(path),
              metadata={"format": "pt", "lora_adapter_metadata": raw})
    return str(path)


def test_metadata_diffusers_could_not_use_either_is_refused_saying_why(folder, tmp_path):
    unet = {"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS}
    cases = [("not json", "is not a JSON object"),
             ("[4]", "is not a JSON object"),
             (json.dumps({"unet.layers_pattern": "blocks"}),
              r"\(unet\): its LoRA metadata is no LoraConfig: When `layers_pattern`"),
             (json.dumps({"unet.r": "four"}), "gives a rank that is no positive whole number"),
             (json.dumps({"unet.alpha_pattern": {"to_k": None}}), "or an alpha that is no"),
             (json.dumps({"unet.lora_bias": True}), r"\(unet\) uses LoRA biases"),
             (json.dumps({"unet.r": 4, "unet.use_shiny_new_lora": True}),
              "sets use_shiny_new_lora, which this PEFT does not know")]
    for raw, message in cases:
        with pytest.raises(AdapterInvalid, match=message):
            file_scalings(_with_metadata(folder, tmp_path, raw), "adapter edited")
    # A rank that the weights do not have shows when the layer is staged.
    raw = json.dumps({f"unet.{k}": v for k, v in unet.items()})
    (scaling,) = file_scalings(_with_metadata(folder, tmp_path, raw), "x").values()
    assert scaling("mid_block.attentions.0.proj_in", 4, 8.0) == 2.0  # metadata first
    with pytest.raises(AdapterInvalid, match=r"\(unet\): its metadata gives .*to_v rank 4, "
                                             "its weights rank 2"):
        scaling("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", 2, None)
    # A newer PEFT's option left at its default changes nothing and is let through.
    raw = json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_shiny_new_lora": None})
    (scaling,) = file_scalings(_with_metadata(folder, tmp_path, raw), "x").values()
    assert scaling("down_blocks.1.attentions.0.proj_in", 4, None) == 2.0


def test_the_catalog_takes_files_with_metadata_as_any_other(folder):
    entries = AdapterCatalog.scan([(folder, "sdxl", 1.0)]).entries
    assert {name: (e.rank, e.layout) for name, e in entries.items()} == {
        "bare": (4, "peft"), "tuned": (4, "peft")}


def test_text_patterns_name_layers_as_the_file_does(folder, tmp_path, tiny_sdxl_path):
    """A file written with transformers 4 names every encoder layer under `text_model.`,
    which transformers 5's CLIPTextModel has not (its CLIPTextModelWithProjection has);
    a pattern written with such a whole name still picks its layer in both encoders."""
    with safe_open(folder / "tuned.safetensors", framework="pt") as handle:
        options = json.loads(handle.metadata()["lora_adapter_metadata"])
    tensors = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."): v
               for k, v in load_file(folder / "tuned.safetensors").items()}
    assert sum(".text_model." in k for k in tensors) == 48  # 2 encoders × 2 layers × 6 × 2
    inner = "text_model.encoder.layers"
    options["text_encoder.alpha_pattern"] = {f"{inner}.0.mlp.fc2": 12}
    options["text_encoder_2.rank_pattern"] = {f"{inner}.{i}.mlp.fc1": 2 for i in (0, 1)}
    options["text_encoder_2.alpha_pattern"] = {f"{inner}.0.mlp.fc2": 12}
    save_file(tensors, str(tmp_path / "named.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(options)})
    weights = _engine(tiny_sdxl_path, tmp_path).adapters.read("named")
    found = {prefix: {path.split("layers.")[1]: (a.shape[0], factor)
                      for path, (a, _, factor) in layers.items() if ".mlp." in path}
             for prefix, layers in weights.text.items()}
    assert found["text_encoder"] == {"0.mlp.fc1": (4, 3.0), "1.mlp.fc1": (4, 3.0),
                                     "0.mlp.fc2": (4, 6.0), "1.mlp.fc2": (4, 3.0)}  # 12/√4
    assert found["text_encoder_2"] == {"0.mlp.fc1": (2, 1 / 2), "1.mlp.fc1": (2, 1 / 2),
                                       "0.mlp.fc2": (4, 12 / 4), "1.mlp.fc2": (4, 1 / 4)}
