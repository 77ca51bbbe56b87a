"""The text-encoder parts of LoRA adapters on the tiny SDXL model: read in the
diffusers/PEFT layout and in kohya's (`lora_te1_`/`lora_te2_`, alpha at half the rank),
applied while a request's prompt is encoded and only then. Diffusers' own
`load_lora_weights` is the reference for what such an adapter does."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from serve.adapters import AdapterCatalog, AdapterInvalid, AdapterSet
from serve.types import GenerationRequest
from tests.lora_files import RANK, TE_TARGETS, UNET_TARGETS, random_lora

REQUEST = {"model": "m", "prompt": "a cat in a hat", "negative_prompt": "blurry",
           "width": 64, "height": 64, "num_inference_steps": 3, "guidance_scale": 7.5,
           "seed": 5, "scheduler": "K_EULER"}


def _kohya(state, stem_prefix, inner=""):
    """PEFT keys in kohya's layout (module paths under `inner`), with alpha at half the
    rank."""
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".lora_", 1)
        stem = stem_prefix + (inner + module.removeprefix(inner)).replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor
        out[f"{stem}.alpha"] = torch.tensor(RANK / 2)
    return out


@pytest.fixture(scope="module")
def folder(tiny_sdxl_path, tmp_path_factory):
    """Three adapters: UNet and both text encoders in diffusers' layout ("styled"), the
    same kind in kohya's ("kohya-styled"), and the text encoders alone ("words-only")."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    out = tmp_path_factory.mktemp("text-loras")
    for seed, name in ((11, "styled"), (21, "kohya-styled"), (31, "words-only")):
        unet = {} if name == "words-only" else random_lora(pipe.unet, UNET_TARGETS, seed)
        te1 = random_lora(pipe.text_encoder, TE_TARGETS, seed + 1)
        te2 = random_lora(pipe.text_encoder_2, TE_TARGETS, seed + 2)
        if name == "kohya-styled":
            state = (_kohya(unet, "lora_unet_") | _kohya(te1, "lora_te1_", "text_model.")
                     | _kohya(te2, "lora_te2_", "text_model."))
        else:
            state = ({f"unet.{k}": v for k, v in unet.items()}
                     | {f"text_encoder.{k}": v for k, v in te1.items()}
                     | {f"text_encoder_2.{k}": v for k, v in te2.items()})
        save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
    return out


def _engine(path, folder, **options):
    from deployments.engines.sdxl import SDXLEngine

    catalog = AdapterCatalog.scan([(folder, "sdxl", 1.0)]).entries
    return SDXLEngine(path, "float32", "cpu", adapters=catalog, max_adapters=2,
                      max_lora_rank=RANK, lora_targets=UNET_TARGETS, **options)


@pytest.fixture(scope="module")
def engine(tiny_sdxl_path, folder):
    return _engine(tiny_sdxl_path, folder)


@contextmanager
def _catalogued(engine, folder):
    """The adapters of `folder` in the engine's catalog for the block's length."""
    entries = AdapterCatalog.scan([(folder, "sdxl", 1.0)]).entries
    engine.adapters._catalog.update(entries)
    try:
        yield
    finally:
        for name in entries:
            del engine.adapters._catalog[name]


def _req(adapters=(), **overrides):
    return GenerationRequest(**(REQUEST | overrides), adapters=AdapterSet.of(adapters))


def _embeds(engine, request):
    """The request's prompt embeddings as a replica makes them before its call (the
    adapters held first, as the replica does), and whether they were held already."""
    if request.adapters:
        engine.adapters.activate(request.adapters)
    prepared, held = engine.prepare(request)
    return prepared.embeds, held


def _diffusers(path, folder, name, scale):
    """Diffusers' pipeline with the adapter loaded its own way (UNet and text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name="reference")
    pipe.set_adapters(["reference"], [scale])
    return pipe


@pytest.mark.parametrize(("name", "scale"), [("styled", 1.0), ("kohya-styled", 0.6),
                                             ("words-only", 1.0)])
def test_embeddings_and_pixels_are_those_of_diffusers_own_loading(engine, folder,
                                                                  tiny_sdxl_path, name,
                                                                  scale):
    request = _req([(name, scale)])
    ours, _ = _embeds(engine, request)
    plain, _ = _embeds(engine, _req())
    pipe = _diffusers(tiny_sdxl_path, folder, name, scale)
    theirs = pipe.encode_prompt(prompt=REQUEST["prompt"], device="cpu",
                                num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=REQUEST["negative_prompt"])
    for a, b, base in zip(ours, theirs, plain, strict=True):
        assert (a - base).abs().max() > 1e-3  # the adapter changes every embedding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (images,) = engine.generate([request])
    reference = pipe(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                     width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
                     generator=[torch.Generator("cpu").manual_seed(5)]).images[0]
    diff = np.abs(np.asarray(images[0]).astype(int) - np.asarray(reference).astype(int))
    assert diff.max() <= 1


def test_a_prompt_is_held_apart_for_each_text_adapter_and_scale(engine):
    plain, _ = _embeds(engine, _req(prompt="a held apart prompt"))
    styled, held = _embeds(engine, _req([("styled", 1.0)], prompt="a held apart prompt"))
    half, held_half = _embeds(engine, _req([("styled", 0.5)], prompt="a held apart prompt"))
    again, held_again = _embeds(engine, _req([("styled", 1.0)], prompt="a held apart prompt"))
    assert (held, held_half, held_again) == (False, False, True)
    assert again is styled
    assert (styled[0] - plain[0]).abs().max() > 1e-3
    assert (half[0] - plain[0]).abs().max() < (styled[0] - plain[0]).abs().max()
    # Scale 0 changes nothing: the plain encoding is used.
    zero, held_zero = _embeds(engine, _req([("styled", 0.0)], prompt="a held apart prompt"))
    assert held_zero and zero is plain


def test_requests_with_and_without_text_adapters_share_a_call_with_their_own_images(engine):
    styled, plain = _req([("words-only", 1.0)], seed=8), _req(seed=9)
    alone = [engine.generate([r])[0][0] for r in (styled, plain)]
    together = engine.generate([styled, plain])
    for a, b in zip(alone, (together[0][0], together[1][0]), strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    unstyled = engine.generate([_req(seed=8)])[0][0]  # same seed, no adapter
    assert np.abs(np.asarray(alone[0]).astype(int)
                  - np.asarray(unstyled).astype(int)).mean() > 1


def test_encodings_on_other_threads_meanwhile_see_the_plain_encoders(engine):
    """The refiner encodes on the pipeline thread while the prompt thread encodes with
    adapters: the terms are this thread's alone."""
    import threading

    text = engine.adapters.text
    encoder = engine.pipe.text_encoder_2
    ids = engine.pipe.tokenizer_2(["a cat"], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = encoder(ids).text_embeds
    engine.adapters.activate(AdapterSet.of([("styled", 1.0)]))
    seen = []
    with text.applied(text.tag(AdapterSet.of([("styled", 1.0)]))), torch.no_grad():
        thread = threading.Thread(target=lambda: seen.append(encoder(ids).text_embeds))
        thread.start()
        thread.join()
        styled = encoder(ids).text_embeds
    assert torch.equal(seen[0], plain)
    assert (styled - plain).abs().max() > 1e-3


def test_text_parts_evicted_are_read_again_with_the_same_embeddings(tiny_sdxl_path, folder):
    engine = _engine(tiny_sdxl_path, folder)
    first, _ = _embeds(engine, _req([("styled", 1.0)], prompt="a returning prompt"))
    for name in ("kohya-styled", "words-only"):  # two slots: "styled" leaves
        _embeds(engine, _req([(name, 1.0)]))
    assert "styled" not in engine.adapters.loaded
    text, reads = engine.adapters.text, []
    read = text._read
    text._read = lambda name: reads.append(name) or read(name)
    engine.prompts._held.clear()  # encode again rather than find it held
    again, held = _embeds(engine, _req([("styled", 1.0)], prompt="a returning prompt"))
    assert not held
    assert reads == []  # activating it again read the file and held its text parts
    text._held.pop("styled")
    engine.prompts._held.clear()
    last, held_last = _embeds(engine, _req([("styled", 1.0)], prompt="a returning prompt"))
    assert not held_last
    assert reads == ["styled"]  # parts gone from the LRU alone: read from the file
    for a, b, c in zip(first, again, last, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("fuse", [False, True], ids=["slots", "merged"])
def test_a_direct_call_reads_an_adapters_file_once(tiny_sdxl_path, folder, engine, fuse):
    """Called directly (benchmarks), the engine holds a call's adapters before it encodes
    their prompts, as a replica does: the file is read once, text parts and all."""
    fresh = _engine(tiny_sdxl_path, folder, fuse_adapters=fuse)
    reads, read = [], fresh.adapters.read
    fresh.adapters.read = lambda name: reads.append(name) or read(name)
    request = _req([("styled", 0.9)], prompt="a prompt first seen in this call")
    (images,) = fresh.generate([request])
    assert reads == ["styled"]
    (twice,) = fresh.generate([request])
    assert reads == ["styled"] and fresh.prompts.get(request)[1]  # held: nothing read again
    engine.adapters.activate(request.adapters)  # a replica's order, on the other engine
    (reference,) = engine.generate([request], prepared=[engine.prepare(request)[0]])
    for ours in (images, twice):
        assert np.abs(np.asarray(ours[0]).astype(int)
                      - np.asarray(reference[0]).astype(int)).max() <= 1


def test_merged_adapters_encode_prompts_with_their_text_parts_too(tiny_sdxl_path, folder,
                                                                 engine):
    fused = _engine(tiny_sdxl_path, folder, fuse_adapters=True)
    request = _req([("kohya-styled", 0.6)], prompt="a merged prompt")
    ours, _ = _embeds(fused, request)
    slots, _ = _embeds(engine, request)
    for a, b in zip(ours, slots, strict=True):
        assert torch.equal(a, b)


def test_text_parts_that_do_not_fit_the_encoders_are_refused(engine, folder, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "words-only.safetensors")
    key = next(k for k in state if k.startswith("text_encoder_2.") and "lora_A" in k)
    state[key] = torch.zeros(RANK, state[key].shape[1] + 8)
    save_file(state, str(tmp_path / "misfit.safetensors"))
    with _catalogued(engine, tmp_path), pytest.raises(AdapterInvalid,
                                                      match="text_encoder_2.*does not fit"):
        engine.adapters.read("misfit")


def test_encoder_layers_are_found_with_or_without_clips_inner_model_in_their_names(
        engine, folder, tmp_path):
    """Transformers 4 names CLIPTextModel's layers under `text_model.`, transformers 5 does
    not (CLIPTextModelWithProjection keeps it in both), so a file written under one may
    name the inner model where the loaded encoder has none, or the other way round. A file
    that names one layer both ways is refused: which of the two pairs it means is
    unknown."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "styled.safetensors")
    renamed = {k.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")
                .replace("text_encoder_2.text_model.", "text_encoder_2."): v
               for k, v in state.items()}
    assert sum(k.startswith("text_encoder.text_model.") for k in renamed) == 24
    assert sum(k.startswith("text_encoder_2.encoder.") for k in renamed) == 24
    save_file(renamed, str(tmp_path / "other-names.safetensors"))
    twice = renamed | {k.replace("text_encoder_2.", "text_encoder_2.text_model."): v.clone()
                       for k, v in renamed.items()
                       if k.startswith("text_encoder_2.encoder.layers.1.mlp.fc2.")}
    save_file(twice, str(tmp_path / "named-twice.safetensors"))
    with _catalogued(engine, tmp_path):
        with pytest.raises(AdapterInvalid, match=r"\(text_encoder_2\) changes "
                           r"text_model\.encoder\.layers\.1\.mlp\.fc2 twice"):
            engine.adapters.read("named-twice")
        assert ({p: {path: a.shape for path, (a, _, _) in layers.items()}
                 for p, layers in engine.adapters.read("other-names").text.items()}
                == {p: {path: a.shape for path, (a, _, _) in layers.items()}
                    for p, layers in engine.adapters.read("styled").text.items()})
        ours, _ = _embeds(engine, _req([("other-names", 0.8)]))
        theirs, _ = _embeds(engine, _req([("styled", 0.8)]))
        plain, _ = _embeds(engine, _req())
        for a, b, c in zip(ours, theirs, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert (a - c).abs().max() > 1e-3


def test_a_flux_adapters_clip_part_gives_the_embeddings_of_diffusers_own_loading(
        tiny_flux_path, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from deployments.engines.flux import FluxEngine

    pipe = FluxPipeline.from_pretrained(tiny_flux_path, local_files_only=True)
    state = ({f"transformer.{k}": v for k, v in
              random_lora(pipe.transformer, ["to_q", "to_k", "to_v"], 41).items()}
             | {f"text_encoder.{k}": v for k, v in
                random_lora(pipe.text_encoder, TE_TARGETS, 42).items()})
    save_file(state, str(tmp_path / "lit.safetensors"), metadata={"format": "pt"})
    catalog = AdapterCatalog.scan([(tmp_path, "flux", 1.0)]).entries
    engine = FluxEngine(tiny_flux_path, "float32", "cpu", adapters=catalog, max_adapters=1,
                        max_lora_rank=RANK, lora_targets=["to_q", "to_k", "to_v"])
    flux = {"prompt": "a lamp", "guidance_scale": 3.5, "scheduler": "FlowMatchEuler",
            "negative_prompt": ""}
    ours, _ = _embeds(engine, _req([("lit", 0.8)], **flux))
    plain, _ = _embeds(engine, _req(**flux))
    pipe.load_lora_weights(str(tmp_path / "lit.safetensors"), adapter_name="reference")
    pipe.set_adapters(["reference"], [0.8])
    theirs = pipe.encode_prompt(prompt="a lamp", prompt_2=None, device="cpu",
                                num_images_per_prompt=1,
                                max_sequence_length=engine.max_sequence_length)
    # The T5 embeddings stay; CLIP's pooled embedding carries the adapter.
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[0], plain[0])
    assert (ours[1] - plain[1]).abs().max() > 1e-3


def test_only_layers_that_an_adapter_changes_carry_a_hook(tiny_sdxl_path, folder):
    engine = _engine(tiny_sdxl_path, folder)
    encoders = {"text_encoder": engine.pipe.text_encoder,
                "text_encoder_2": engine.pipe.text_encoder_2}

    def hooked():
        return {(prefix, path) for prefix, encoder in encoders.items()
                for path, layer in encoder.named_modules()
                if isinstance(layer, torch.nn.Linear) and layer._forward_hooks}

    _embeds(engine, _req(prompt="no adapter yet"))
    assert hooked() == set()  # encoders no adapter touched run as they are
    _embeds(engine, _req([("words-only", 1.0)]))
    parts = engine.adapters.text._held["words-only"]
    assert hooked() == {(prefix, path) for prefix, pairs in parts.items() for path in pairs}
    assert len(hooked()) > 20 and ("text_encoder_2", "text_projection") not in hooked()
