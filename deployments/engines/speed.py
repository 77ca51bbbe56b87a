"""Speed settings applied to a loaded pipeline: fused QKV, FP8 linear layers,
channels-last memory layout, regional torch.compile with a persistent cache, and the
order in which fused attention kernels are tried."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from deployments.engines.layout import compile_edges, keep_channels_last
from serve.config import SpeedConfig

log = logging.getLogger("ray.serve.atelier.engine")

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
# Calibrated FP8 activations: room above the largest magnitude calibration saw. A factor
# of 2 costs e4m3 one of its 15 binades (its relative precision is the same in each).
CALIBRATION_MARGIN = 2.0
# The calibration call: prompts of different kinds (and, with guidance, the empty one).
CALIBRATION_PROMPTS = ("a photograph of an astronaut riding a horse on the moon",
                       "a watercolor painting of a crowded market street at dusk, detailed",
                       "a close-up portrait of an old fisherman, studio lighting, 85mm")
CALIBRATION_STEPS = 20
# The transformer blocks of SDXL's UNet and of FLUX's transformer: their linear layers are
# the ones made FP8.
_TRANSFORMER_BLOCKS = ("BasicTransformerBlock", "FluxTransformerBlock",
                       "FluxSingleTransformerBlock")
# Blocks that repeat through the denoiser and the VAE decoder: compiling each class once
# (its instances share the compiled code) costs a fraction of compiling the whole network.
_REPEATED_BLOCKS = (*_TRANSFORMER_BLOCKS, "ResnetBlock2D")


class Fp8Linear(nn.Module):
    """A linear layer computed in FP8 e4m3: weights quantized when made (and rows of them
    again by `set_rows`), activations at each call, per row (each output row of the
    weights, each row of activations) or per tensor; multiplied by `torch._scaled_mm`,
    which adds the bias and returns bf16 (cast back to the input's dtype). `fast_accum`
    keeps the products in the FP8 units' own accumulators instead of promoting them to
    float32 every 128 terms: faster on Hopper, as FP8 inference usually runs, and slightly
    less exact. Calibrated (`calibrate_fp8`), activations take one fixed scale instead of
    their own at each call: quantizing them is then a step of the kernel that makes them,
    not a pass over each row for its largest value."""

    observed: torch.Tensor | None = None  # while calibrating: the largest input magnitude

    def __init__(self, linear: nn.Linear, per_row: bool = True, fast_accum: bool = True):
        super().__init__()
        w = linear.weight.detach().float()
        self.per_row, self.fast_accum = per_row, fast_accum
        # Per row: one scale for each output row, made as the row is quantized. Per
        # tensor: one for the whole matrix, set here from its largest magnitude.
        scale = torch.ones(1, w.shape[0]) if per_row else _amax(w, None) / E4M3_MAX
        self.register_buffer("weight_scale", scale.clamp(min=1e-12).to(w.device))
        self.register_buffer("weight", torch.empty_like(w, dtype=torch.float8_e4m3fn))
        self.set_rows(slice(0, w.shape[0]), w)
        # The product's epilogue adds a bias of the output's dtype.
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.register_buffer("input_scale", None)  # set by calibration
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @torch.no_grad()
    def set_rows(self, rows: slice, w: torch.Tensor) -> None:
        """Quantize float weights `w` into output rows `rows`, in place (compiled code
        that holds the buffers computes with the new weights). Per row, each row gets its
        own scale, so rows set again from the same floats come back bit for bit; per
        tensor, the scale set at construction stays and larger values are clipped to it."""
        w = w.float()
        if self.per_row:
            self.weight_scale[:, rows] = (_amax(w, 1) / E4M3_MAX).clamp(min=1e-12).t()
        scale = self.weight_scale[:, rows].t() if self.per_row else self.weight_scale
        self.weight[rows] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()` and the like move the buffers but keep their dtypes:
        FP8 weights, float32 scales and the bf16 bias are what `_scaled_mm` takes, whatever
        the rest of the model is cast to."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """FP8 matrix products need both dimensions to be multiples of 16."""
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.observed is not None:
            self.observed = torch.maximum(self.observed, _amax(rows, None).float())
        if self.input_scale is None:
            dim = 1 if self.per_row else None
            x_scale = (_amax(rows, dim).float() / E4M3_MAX).clamp(min=1e-12)
        else:  # row-wise products take a scale per row: the fixed one, repeated
            x_scale = (self.input_scale.repeat(rows.shape[0], 1) if self.per_row
                       else self.input_scale)
        q = (rows.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16,
                               use_fast_accum=self.fast_accum)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _amax(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Largest magnitude per row (dim 1, kept as a column) or of the whole tensor."""
    return x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)


# The layers diffusers' QKV fusion adds, each with the separate projections it replaces.
# Cross-attention fuses only key and value: its query projection keeps running.
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
          "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fuse_qkv(denoiser: nn.Module) -> int:
    """Fuse each attention's query, key and value projections into one layer, and drop the
    separate ones, which diffusers keeps (for unfusing, which nothing here does) although
    no call runs them any more; return how many parameters were dropped. Cross-attentions
    with an IP-Adapter keep their own projections and attention (which reads them)."""
    image_prompted = [(module, module.processor) for module in denoiser.modules()
                      if isinstance(getattr(module, "processor", None),
                                    IPAdapterAttnProcessor2_0)]
    denoiser.fuse_qkv_projections()
    for module, processor in image_prompted:
        del module.to_kv
        module.fused_projections = False
        module.set_processor(processor)
    dropped = 0
    for attention in denoiser.modules():
        if not getattr(attention, "fused_projections", False):
            continue
        for fused, parts in _FUSED.items():
            if getattr(attention, fused, None) is None:
                continue
            for part in parts:
                dropped += sum(p.numel() for p in getattr(attention, part).parameters())
                delattr(attention, part)
    return dropped


def linear_rows(denoiser: nn.Module) -> dict[str, tuple[nn.Module, slice]]:
    """Each linear layer of the denoiser by the path it has in the model as loaded, as
    (the layer that computes it now, nn.Linear or Fp8Linear; its output rows there): all
    of its own rows, or its share of a fused QKV layer (`fuse_qkv`)."""
    rows = {}
    for path, module in denoiser.named_modules():
        if isinstance(module, (nn.Linear, Fp8Linear)):
            rows[path] = (module, slice(0, module.out_features))
        if not getattr(module, "fused_projections", False):
            continue
        for fused, parts in _FUSED.items():
            layer = getattr(module, fused, None)
            if layer is None:
                continue
            size = layer.out_features // len(parts)
            for i, part in enumerate(parts):
                rows[f"{path}.{part}"] = (layer, slice(i * size, (i + 1) * size))
    return rows


def fp8_candidates(denoiser: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """The linear layers `speed.fp8` computes in FP8: those inside the denoiser's
    transformer blocks whose sizes fit, each as (its block, its name in the block, it)."""
    return [(block, name, child)
            for block in denoiser.modules() if type(block).__name__ in _TRANSFORMER_BLOCKS
            for name, child in block.named_modules()
            if type(child) is nn.Linear and Fp8Linear.fits(child)
            and "processor" not in name.split(".")]  # an IP-Adapter's own: 4 to 16 tokens


def to_fp8(denoiser: nn.Module, per_row: bool = True, fast_accum: bool = True) -> int:
    """Replace the fp8_candidates of the denoiser by Fp8Linear; return how many."""
    layers = fp8_candidates(denoiser)
    for block, name, child in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, attr, Fp8Linear(child, per_row, fast_accum))
    return len(layers)


def calibration_calls(request):
    """The requests of the calibration call: `request` (a GenerationRequest) with each of
    `CALIBRATION_PROMPTS`, one image each, at `CALIBRATION_STEPS` steps or more
    (activations change along the schedule)."""
    steps = max(request.num_inference_steps, CALIBRATION_STEPS)
    return [replace(request, prompt=prompt, num_outputs=1, seed=request.seed + i,
                    num_inference_steps=steps)
            for i, prompt in enumerate(CALIBRATION_PROMPTS)]


def calibrate_fp8(denoiser: nn.Module, run: Callable[[], object],
                  margin: float = CALIBRATION_MARGIN) -> int:
    """Fix the input scale of each Fp8Linear of `denoiser` from the largest magnitude its
    inputs reach while `run` runs (uncompiled, with scales made at each call), times
    `margin`: later inputs up to that are represented, larger ones clip to e4m3's largest
    value. Layers `run` did not reach keep scaling at each call. Return how many were fixed."""
    layers = [m for m in denoiser.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.input_scale = None
        layer.observed = torch.zeros((), device=layer.weight.device)
    try:
        with torch.compiler.set_stance("force_eager"):
            run()
    finally:
        seen = [(layer, layer.observed) for layer in layers]
        for layer, _ in seen:
            layer.observed = None
    fixed = 0
    for layer, amax in seen:
        if amax is not None and amax.item() > 0:
            layer.input_scale = (amax * margin / E4M3_MAX).clamp(min=1e-12)
            fixed += 1
    return fixed


def compile_blocks(modules: list[nn.Module], cache_dir: Path, dynamic: bool = True,
                   mode: str = "default", batch_sizes: int = 1) -> int:
    """Compile every repeated block of `modules` (with dynamic shapes, or specialised to
    each shape met, of `batch_sizes` batch sizes) in torch.compile's `mode`, caching the
    compiled code under `cache_dir`; return how many blocks were wrapped. Compilation
    itself happens at each block's first call."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)  # read at each cache access
    # One code object serves many block variants (with or without a shortcut, time
    # embedding or cross-attention; SDXL's UNet and VAE decoder hold about 21 resnet
    # shapes), each compiled again for every batch size: allow a compiled graph for each,
    # rather than have dynamo run the blocks past the limit uncompiled.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64 * batch_sizes)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                             256 * batch_sizes)
    wrapped = 0
    for root in modules:
        for module in root.modules():
            if type(module).__name__ in _REPEATED_BLOCKS:
                module.compile(dynamic=dynamic, mode=mode)
                wrapped += 1
    return wrapped


# The attention kernels in the order each setting tries them; all stay enabled.
_ATTENTION_ORDER = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                  SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH],
}


def attention_order(name: str) -> contextlib.AbstractContextManager:
    """A context in which scaled-dot-product attention tries kernels in `name`'s order
    (PyTorch's own for auto). The order is process-wide while it lasts; every kernel stays
    enabled, so work on other threads (prompt encoding) only sees another order."""
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel(_ATTENTION_ORDER[name], set_priority=True)


def apply_speed(pipe, denoiser: nn.Module, speed: SpeedConfig, cache_dir: Path) -> dict:
    """Prepare `pipe`, whose `denoiser` (UNet or transformer) runs every step, as `speed`
    asks, in the order the settings build on each other; return what was done, for the
    logs."""
    done: dict = {}
    if speed.fuse_qkv:
        done["fused_qkv"] = True
        done["unfused_params_dropped"] = fuse_qkv(denoiser)
    if speed.fp8:
        done["fp8_linears"] = to_fp8(denoiser, per_row=speed.fp8_scaling == "row",
                                     fast_accum=speed.fp8_fast_accum)
        done["fp8_scaling"] = speed.fp8_scaling
        done["fp8_fast_accum"] = speed.fp8_fast_accum
    if speed.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        done["channels_last"] = True
        if models := keep_channels_last(denoiser):
            done["channels_last_transformer_outputs"] = models
    if speed.compile:
        # Padded to a few batch sizes, each shape can be compiled exactly.
        done["compiled_blocks"] = compile_blocks([denoiser, pipe.vae.decoder], cache_dir,
                                                 dynamic=not speed.batch_buckets,
                                                 mode=speed.compile_mode,
                                                 batch_sizes=max(1, len(speed.batch_buckets)))
        if models := compile_edges(denoiser, dynamic=not speed.batch_buckets,
                                   mode=speed.compile_mode):
            done["compiled_transformer_edges"] = models
        if speed.compile_mode != "default":
            done["compile_mode"] = speed.compile_mode
    if speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        done["cudnn_benchmark"] = True
    if speed.batch_buckets:
        done["batch_buckets"] = list(speed.batch_buckets)
    if speed.attention != "auto":
        done["attention"] = speed.attention
    if done:
        log.info("speed settings applied: %s", done)
    return done
