"""LoRA slot layers: each targeted projection of the denoiser, as the speed settings left
it (a linear layer, its rows of a fused QKV layer, an FP8 layer), computes

    base(x) + sum over the row's adapters k:  scale_k * alpha_k/rank * B_k @ A_k @ x

from slots of stacked A and B tensors. Which slots each batch row reads is a tensor of
slot indexes (`SlotLinear.slot_rows`), so one call can run rows with different adapter
sets, and switching sets writes that tensor: no module changes, so compiled code is
reused. A fused layer keeps one rank block per part it computes (query, key, value), so
each part takes its own LoRA pair and alpha.
"""

from __future__ import annotations

import torch
from torch import nn


class SlotLinear(nn.Module):
    """`base` (nn.Linear or speed.Fp8Linear, computing `parts` equal row blocks) plus the
    LoRA terms its `slot_rows` select: `slots` slots of rank `rank`, and one more, all
    zeros, that pads rows with fewer adapters than others (index `slots`).

    `slot_rows` (rows, K) and `slot_scales` (rows, K) give, for each row of the input's
    first dimension, the slots it adds and their scales; None: the base layer alone.
    """

    def __init__(self, base: nn.Module, parts: int, slots: int, rank: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base, self.parts, self.rank = base, parts, rank
        self.in_features, self.out_features = base.in_features, base.out_features
        part_out = self.out_features // parts
        self.register_buffer("lora_a", torch.zeros(slots + 1, parts, rank, self.in_features,
                                                   dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(slots + 1, parts, part_out, rank,
                                                   dtype=dtype, device=device))
        # alpha/rank of each slot's pair for each part; 0 where a slot leaves a part alone.
        self.register_buffer("lora_alpha", torch.zeros(slots + 1, parts, dtype=dtype,
                                                       device=device))
        self.slot_rows: torch.Tensor | None = None
        self.slot_scales: torch.Tensor | None = None

    @torch.no_grad()
    def fill(self, slot: int, part: int, pair: tuple[torch.Tensor, torch.Tensor, float] | None,
             ) -> None:
        """Write one part of `slot`: LoRA pair (A, B, alpha/rank) of a rank up to the
        slot's, or None to leave that part unchanged by the slot."""
        a_slot, b_slot = self.lora_a[slot, part], self.lora_b[slot, part]
        if pair is None:
            b_slot.zero_()
            self.lora_alpha[slot, part] = 0
            return
        a, b, alpha = pair
        rank = a.shape[0]
        a_slot[:rank].copy_(a, non_blocking=True)
        a_slot[rank:].zero_()
        b_slot[:, :rank].copy_(b, non_blocking=True)
        b_slot[:, rank:].zero_()
        self.lora_alpha[slot, part] = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.slot_rows is None:
            return y
        rows, slots = self.slot_rows, self.slot_rows.shape[1]
        a = self.lora_a[rows]  # (batch, K, parts, rank, in)
        b = self.lora_b[rows]  # (batch, K, parts, part_out, rank)
        factor = self.lora_alpha[rows] * self.slot_scales.unsqueeze(-1)  # (batch, K, parts)
        tokens = x.reshape(rows.shape[0], -1, self.in_features).to(a.dtype)
        down = torch.einsum("bti,bkpri->btkpr", tokens, a)
        down = down * factor.view(rows.shape[0], 1, slots, self.parts, 1)
        up = torch.einsum("btkpr,bkpor->btpo", down, b)
        return y + up.reshape(y.shape).to(y.dtype)


def wrap_targets(denoiser: nn.Module, paths: list[str], slots: int, rank: int,
                 dtype: torch.dtype) -> dict[str, tuple[SlotLinear, int]]:
    """Put a SlotLinear around each layer that computes one of `paths` (module paths of
    the denoiser as loaded) now; return, per path, its slot layer and its part there."""
    from deployments.engines.speed import linear_rows

    computing = linear_rows(denoiser)
    names = {id(module): name for name, module in denoiser.named_modules()}
    wrapped: dict[int, SlotLinear] = {}
    found = {}
    for path in paths:
        layer, rows = computing[path]
        size = rows.stop - rows.start
        if id(layer) not in wrapped:
            slot_layer = SlotLinear(layer, layer.out_features // size, slots, rank, dtype,
                                    layer.weight.device)
            parent, _, attr = names[id(layer)].rpartition(".")
            setattr(denoiser.get_submodule(parent) if parent else denoiser, attr, slot_layer)
            wrapped[id(layer)] = slot_layer
        found[path] = (wrapped[id(layer)], rows.start // size)
    return found


def slot_widths(capacity: int) -> tuple[int, ...]:
    """The adapter counts per row that compiled calls are padded up to: powers of two
    below `capacity`, and `capacity`. Compiled code is specialised for one adapter per
    row and general from two on, or, with static shapes, for each count: the warm-up
    runs each of these, so no count met later compiles under load."""
    widths, width = [], 1
    while width < capacity:
        widths.append(width)
        width *= 2
    return (*widths, capacity)


class SlotRouting:
    """Which slots each row of the running call reads: set per call (`route`), and placed
    on the slot layers before each denoiser forward, for the rows still in the batch (a
    call's rows shrink as requests leave) and as many times over as the forward's batch
    holds them (classifier-free guidance runs every row twice)."""

    def __init__(self, capacity: int):
        self._zero = capacity  # the all-zero slot
        self._layers: tuple[SlotLinear, ...] = ()
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows = None
        self._placed: tuple | None = None  # what the layers hold now
        # Compiled: the adapter counts per row that calls are padded up to (slot_widths),
        # with the all-zero slot; () runs each call at its own largest count.
        self.widths: tuple[int, ...] = ()
        # Warm-up: calls without adapters run the slot layers as calls with this many
        # adapters per row do (all on the all-zero slot); 0: they skip the slot layers.
        self.primed = 0

    def attach(self, denoiser: nn.Module, layers: set[SlotLinear]) -> None:
        self._layers = tuple(layers)
        denoiser.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def route(self, per_request: list[list[tuple[int, float]]], rows) -> None:
        """One (slot, scale) list per request; `rows` (withdrawal.BatchRows) says how many
        images each request has and which are still live."""
        if not self._layers:
            return
        width = max([self.primed, *(len(p) for p in per_request)])
        if not width:
            self._table, self._rows = None, None
            self._place(None, None, key=None)
            return
        width = next((w for w in self.widths if w >= width), width)
        padded = [p + [(self._zero, 0.0)] * (width - len(p)) for p, size
                  in zip(per_request, rows.sizes, strict=True) for _ in range(size)]
        like = self._layers[0].lora_a
        self._table = (torch.tensor([[s for s, _ in p] for p in padded]).to(like.device),
                       torch.tensor([[c for _, c in p] for p in padded],
                                    dtype=like.dtype).to(like.device))
        self._rows, self._placed = rows, ()

    def _before_forward(self, module, args, kwargs) -> None:
        if self._table is None:
            return
        batch = (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states")))
        live = tuple(self._rows.original_rows())
        key = (live, batch.shape[0])
        if key == self._placed or not live:
            return
        index = torch.tensor(live, device=self._table[0].device)
        times = batch.shape[0] // len(live)
        slots, scales = (t[index].repeat(times, 1) for t in self._table)
        self._place(slots, scales, key)

    def _place(self, slots: torch.Tensor | None, scales: torch.Tensor | None, key) -> None:
        if key == self._placed:
            return
        for layer in self._layers:
            layer.slot_rows, layer.slot_scales = slots, scales
        self._placed = key
