"""Channels-last through SDXL's UNet: its transformer models (diffusers' Transformer2DModel)
turn their tokens back into an image made contiguous in NCHW order, and add the residual,
which is channels-last, to it. That copy, the add across two layouts and the conversions
of the next blocks' inputs back to channels-last are memory-bound passes over large
activations on every step. Here the models' output keeps the tokens' own layout, which
is channels-last, with the same values."""

from __future__ import annotations

import types

import torch
from torch import nn

_MODEL = "Transformer2DModel"


def _output_channels_last(self, hidden_states: torch.Tensor, residual: torch.Tensor,
                          batch_size: int, height: int, width: int,
                          inner_dim: int) -> torch.Tensor:
    """Diffusers' `_get_output_for_continuous_inputs` for a linear output projection, less
    its `.contiguous()`: the tokens, (batch, height x width, channels), viewed as an
    image are channels-last already."""
    hidden_states = self.proj_out(hidden_states)
    image = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return image + residual


def transformer_models(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's transformer models over image feature maps with linear projections
    (SDXL's), whose output `keep_channels_last` changes."""
    return [m for m in denoiser.modules() if type(m).__name__ == _MODEL
            and getattr(m, "is_input_continuous", False) and m.use_linear_projection]


def keep_channels_last(denoiser: nn.Module) -> int:
    """Make each of `transformer_models(denoiser)` return its output channels-last; return
    how many were changed."""
    models = transformer_models(denoiser)
    for model in models:
        model._get_output_for_continuous_inputs = types.MethodType(_output_channels_last,
                                                                   model)
    return len(models)


def compile_edges(denoiser: nn.Module, **options) -> int:
    """Compile the input and output steps of each of `transformer_models(denoiser)` (group
    norm, the turn to tokens and back, the projections, the residual add), which the
    compiled blocks inside them leave out, with torch.compile's `options`; return how
    many models."""
    models = transformer_models(denoiser)
    for model in models:
        for name in ("_operate_on_continuous_inputs", "_get_output_for_continuous_inputs"):
            setattr(model, name, torch.compile(getattr(model, name), **options))
    return len(models)
