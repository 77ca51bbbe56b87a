"""Requests whose prompts take different chunk counts in one SDXL call (`prompts.chunks`).

A prompt read in n chunks is n x 77 tokens of embeddings, and the rows of a pipeline call
need as many. A shorter request's embeddings are padded with zeros to the call's longest,
and while the call runs a hook gives the UNet (the base model's and the refiner's) an
`encoder_attention_mask` that leaves each row's padding out of its cross-attention:
diffusers turns the mask into a bias of -10000, whose weight after the softmax is exactly
0, so each row attends to its own tokens only and its image is the one its own call
draws. Rows with no padding left among the live ones run without a mask.

diffusers' ControlNets take no cross-attention mask, and a mask is a new input to
compiled code: calls with ControlNets, and compiled denoisers, keep chunk counts apart
(`SDXLEngine.batch_key`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn import functional as F

from deployments.engines.prompts import Embeds
from deployments.engines.withdrawal import BatchRows


def padded(embeds: Sequence[Embeds]) -> list[Embeds]:
    """Each request's embeddings, their token sequences (the 3-dimensional ones) padded
    with zeros to the longest's."""
    longest = max(e[0].shape[1] for e in embeds)
    return [tuple(t if t.dim() != 3 or t.shape[1] == longest
                  else F.pad(t, (0, 0, 0, longest - t.shape[1])) for t in e) for e in embeds]


@contextmanager
def padding_masked(denoisers: Sequence[torch.nn.Module], lengths: Sequence[int],
                   rows: BatchRows) -> Iterator[None]:
    """Around a call whose requests' prompts are `lengths` tokens long (one per request
    of `rows`): each denoiser call's cross-attention reads each live row's own tokens,
    both guidance halves or the conditional one alone."""
    if len(set(lengths)) == 1:
        yield
        return
    per_image = [lengths[i] for i, size in enumerate(rows.sizes) for _ in range(size)]

    def masked(module, args, kwargs):
        states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs \
            else args[2]
        own = [per_image[row] for row in rows.original_rows()]
        if states.shape[0] == 2 * len(own):
            own *= 2
        elif states.shape[0] != len(own):
            raise ValueError(f"{states.shape[0]} prompt rows for {len(own)} images")
        if min(own) == states.shape[1]:  # no live row is padded
            return args, kwargs
        tokens = torch.arange(states.shape[1], device=states.device)
        mask = tokens[None] < torch.tensor(own, device=states.device)[:, None]
        return args, kwargs | {"encoder_attention_mask": mask}

    handles = [d.register_forward_pre_hook(masked, with_kwargs=True) for d in denoisers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
