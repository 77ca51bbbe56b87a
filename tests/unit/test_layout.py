"""Channels-last outputs of SDXL's transformer models (deployments/engines/layout.py): the
same values, without the copy to NCHW order."""

import collections

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deployments.engines.layout import keep_channels_last, transformer_models
from serve.config import SpeedConfig
from serve.types import GenerationRequest


class _Copies(TorchDispatchMode):
    """Counts the operators that copy a 4-d tensor into another memory layout."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("contiguous", "clone", "_to_copy", "copy_") and args[0].dim() == 4:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _unet_inputs(unet, batch=2, size=16):
    torch.manual_seed(0)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, size, size).to(
        memory_format=torch.channels_last)
    text = torch.randn(batch, 7, cfg.cross_attention_dim)
    added = {"text_embeds": torch.randn(batch, cfg.projection_class_embeddings_input_dim
                                        - 6 * cfg.addition_time_embed_dim),
             "time_ids": torch.randn(batch, 6)}
    return sample, torch.tensor(500), text, added


def test_the_outputs_stay_channels_last_with_the_same_values(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    engine = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(channels_last=True))
    unet = engine.pipe.unet
    models = transformer_models(unet)
    assert engine.describe()["speed"]["channels_last_transformer_outputs"] == len(models) > 0
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _a, out: outputs.append(out[0]))
             for m in models]
    sample, t, text, added = _unet_inputs(unet)
    with torch.inference_mode(), _Copies() as kept:
        fast = unet(sample, t, text, added_cond_kwargs=added).sample
    assert all(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()
               for o in outputs)
    for model in models:  # diffusers' own output step again
        del model._get_output_for_continuous_inputs
    outputs.clear()
    with torch.inference_mode(), _Copies() as plain_copies:
        plain = unet(sample, t, text, added_cond_kwargs=added).sample
    for hook in hooks:
        hook.remove()
    assert all(o.is_contiguous() for o in outputs)  # NCHW, as diffusers makes them
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # One copy to NCHW order fewer per model.
    assert plain_copies.counts["contiguous"] - kept.counts["contiguous"] >= len(models)
    assert keep_channels_last(unet) == len(models)


def test_images_are_the_plain_layouts_images(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    req = GenerationRequest(model="a/b", prompt="a red cube", width=64, height=64,
                            num_inference_steps=3, guidance_scale=7.5, seed=4,
                            scheduler="K_EULER")
    plain = SDXLEngine(tiny_sdxl_path, "float32", "cpu").generate([req])[0][0]
    fast = SDXLEngine(tiny_sdxl_path, "float32", "cpu", speed=SpeedConfig(
        channels_last=True)).generate([req])[0][0]
    diff = np.abs(np.asarray(plain).astype(int) - np.asarray(fast).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
