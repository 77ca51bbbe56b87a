"""FLUX.1 Kontext edits that read several reference images. Diffusers' FluxKontextPipeline
appends one reference's latent tokens to those being denoised, with position ids on a
plane of their own (first coordinate 1). Further references are encoded the same way,
each at its own size, and laid beside the ones before on that plane, as if the references
were one stitched picture (ComfyUI's `offset` method for Kontext, which the released
model follows; giving each its own plane index needs a model trained for it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import FluxKontextPipeline


def reference_offsets(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each reference of (height, width) `sizes`, in latent patches, starts on the
    references' plane (row, column): each goes below the ones before, or to their right
    where that keeps the stitched whole closer to square, as ComfyUI lays them out."""
    offsets, height, width = [], 0, 0
    for h, w in sizes:
        row, column = (0, width) if h + height > w + width else (height, 0)
        offsets.append((row, column))
        height, width = max(height, h + row), max(width, w + column)
    return offsets


class KontextReferencesPipeline(FluxKontextPipeline):
    """FluxKontextPipeline taking `references`: further reference images (each a batch of
    rows in [0, 1], one per output image, at its own size), whose tokens join the edited
    image's on every step. Without them it is diffusers' pipeline unchanged."""

    _references: Sequence[torch.Tensor] = ()

    def __call__(self, *args, references: Sequence[torch.Tensor] = (), **kwargs):
        self._references = references
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._references = ()

    def prepare_latents(self, image, batch_size, num_channels_latents, height, width, dtype,
                        device, generator=None, latents=None):
        latents, image_latents, latent_ids, image_ids = super().prepare_latents(
            image, batch_size, num_channels_latents, height, width, dtype, device, generator,
            latents)
        if not self._references or image_latents is None:
            return latents, image_latents, latent_ids, image_ids
        packed, ids = [image_latents], [image_ids]
        encoded = [self._encoded(ref, generator, dtype, device) for ref in self._references]
        patches = [tuple(int(side) // 2 for side in lat.shape[2:]) for lat in encoded]
        first = (int(image_ids[:, 1].max()) + 1, int(image_ids[:, 2].max()) + 1)
        for lat, (h, w), (row, column) in zip(encoded, patches,
                                              reference_offsets([first, *patches])[1:],
                                              strict=True):
            packed.append(self._pack_latents(lat, lat.shape[0], num_channels_latents, 2 * h,
                                             2 * w))
            grid = self._prepare_latent_image_ids(lat.shape[0], h, w, device, dtype)
            grid[..., 0], grid[..., 1], grid[..., 2] = 1, grid[..., 1] + row, grid[..., 2] + column
            ids.append(grid)
        return latents, torch.cat(packed, dim=1), latent_ids, torch.cat(ids, dim=0)

    def _encoded(self, reference: torch.Tensor, generator, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """A reference's latents, as the pipeline encodes its one image: preprocessed to
        [-1, 1] at a size the latents pack into, encoded by the VAE (its mode)."""
        multiple = self.vae_scale_factor * 2
        height = reference.shape[2] // multiple * multiple
        width = reference.shape[3] // multiple * multiple
        image = self.image_processor.preprocess(reference, height, width)
        return self._encode_vae_image(image=image.to(device=device, dtype=dtype),
                                      generator=generator)
