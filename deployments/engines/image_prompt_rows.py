"""The per-row parts of a call's image prompts beyond their pictures and scales: masks
(diffusers' `ip_adapter_masks`), made at each size the call draws at, and the attention
blocks each row's picture steers (InstantStyle's style and layout blocks, as diffusers'
`set_ip_adapter_scale` with a dict of blocks sets them for a whole call)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from serve.types import Picture

# Which kinds of block each `blocks` value of a request steers (None: every block).
STEERED: dict[str, set[str] | None] = {"all": None, "style": {"style"}, "layout": {"layout"},
                                       "style_and_layout": {"style", "layout"}}


def block_kinds(unet: torch.nn.Module) -> dict[str, str]:
    """InstantStyle's blocks of an SDXL UNet, by the prefix of their attention processors'
    names: the first up block's middle attention ("style": SDXL's up_blocks.0.attentions.1)
    and the deepest down block's last one ("layout": down_blocks.2.attentions.1)."""
    kinds = {}
    up = getattr(unet.up_blocks[0], "attentions", None)
    if up:
        kinds[f"up_blocks.0.attentions.{len(up) // 2}."] = "style"
    deepest = [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]
    if deepest:
        last = len(unet.down_blocks[deepest[-1]].attentions) - 1
        kinds[f"down_blocks.{deepest[-1]}.attentions.{last}."] = "layout"
    return kinds


def by_block_kind(scales: torch.Tensor, blocks: Sequence[str]) -> dict[str | None, torch.Tensor]:
    """An adapter's scale of each row (`scales`) in each kind of block, the rows steering
    `blocks` (0 in the blocks a row's picture does not steer; None: neither kind)."""
    if all(b == "all" for b in blocks):
        return dict.fromkeys((None, "style", "layout"), scales)
    return {kind: scales * torch.tensor(
        [1.0 if STEERED[b] is None or kind in STEERED[b] else 0.0 for b in blocks],
        device=scales.device) for kind in (None, "style", "layout")}


class RowMasks:
    """The masks of a call's rows, per adapter (None: no row of the call masks it), as
    diffusers' IPAdapterMaskProcessor makes them at each size the call draws at (a hires
    pass's second one too); a row without a mask is white, the whole image."""

    def __init__(self, per_adapter: list[list[Picture | None] | None]):
        self.per_adapter = per_adapter
        self.any = any(rows is not None for rows in per_adapter)
        self._made: dict[tuple[int, int], list[torch.Tensor | None]] = {}

    def live(self, live: torch.Tensor, size: Sequence[int], both: bool
             ) -> list[torch.Tensor | None]:
        """Each adapter's masks (rows, 1 picture, height, width) for the `live` rows at
        `size` (height, width), for both guidance halves if `both`."""
        height, width = size
        if (height, width) not in self._made:
            self._made[height, width] = [None if rows is None else self._made_at(
                rows, height, width).to(live.device) for rows in self.per_adapter]
        out = [None if m is None else m[live] for m in self._made[height, width]]
        return [None if m is None else torch.cat([m, m]) if both else m for m in out]

    @staticmethod
    def _made_at(rows: list[Picture | None], height: int, width: int) -> torch.Tensor:
        white = Picture(bytes([255]) * width * height, width, height)
        pictures = [Image.frombytes("L", (m.width, m.height), m.rgb)
                    for m in (white if mask is None else mask for mask in rows)]
        return IPAdapterMaskProcessor().preprocess(pictures, height=height, width=width)
