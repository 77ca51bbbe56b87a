"""Taking withdrawn requests out of a pipeline call that is already denoising.

A diffusers step callback may hand back replacements for the tensors it was given (the
pipeline's `callback_on_step_end_tensor_inputs`), and the loop goes on with those. Dropping
a request's rows from the latents, from the text conditioning, from the scheduler's
per-sample history and from the per-image generators leaves the computation of every
other image as it was, so they finish with the pixels they would have had, while the
following steps no longer spend compute on images nobody waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

import torch


class BatchRows:
    """Which requests still own rows of the batch, in row order."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = list(sizes)
        self.live = list(range(len(sizes)))
        self._call_start: list[int] | None = None  # of a further pipeline call

    def start_call(self) -> None:
        """A further pipeline call of the batch (a hires pass) starts with the rows live
        now: the inputs it makes before its loop have those rows."""
        self._call_start = self.original_rows()

    def call_rows(self) -> list[int]:
        """The live rows' places among the rows the pipeline call under way started with
        (the first call: all the batch's)."""
        rows = self.original_rows()
        if self._call_start is None:
            return rows
        places = {row: i for i, row in enumerate(self._call_start)}
        return [places[row] for row in rows]

    def drop(self, gone: set[int]) -> list[int]:
        """Forget the requests in `gone`; return the current row indexes to keep."""
        keep, row = [], 0
        for index in self.live:
            size = self.sizes[index]
            if index not in gone:
                keep.extend(range(row, row + size))
            row += size
        self.live = [i for i in self.live if i not in gone]
        return keep

    def original_rows(self) -> list[int]:
        """The rows the live requests held when the call began."""
        starts = [0, *accumulate(self.sizes)]
        return [row for i in self.live for row in range(starts[i], starts[i + 1])]

    def split(self, images: Sequence) -> list[list]:
        """The call's output images per request; an empty list for a withdrawn one."""
        out: list[list] = [[] for _ in self.sizes]
        start = 0
        for index in self.live:
            out[index] = list(images[start:start + self.sizes[index]])
            start += self.sizes[index]
        return out


def step_callback(rows: BatchRows, generators: list, withdrawn: Callable[[], set[int]],
                  on_step: Callable[[int, int], None] | None, shrink_rows: bool = True,
                  cfg_cutoff: float | None = None,
                  previews: Callable[[object, int, torch.Tensor], None] | None = None):
    """A diffusers step callback: reports progress, takes partial images (`previews`,
    see deployments.engines.previews), drops the rows of requests withdrawn since the
    last step (unless `shrink_rows` is False: then they run to the end, and their images
    go nowhere), and interrupts the loop once no request is left. With `cfg_cutoff`,
    guidance stops after step int(steps x cutoff) (`guidance_off`)."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step + 1, pipe.num_timesteps)
        if previews is not None:
            previews(pipe, step, tensors["latents"])
        out = _withdraw(pipe, tensors)
        if (cfg_cutoff is not None and not pipe._interrupt
                and step == int(pipe.num_timesteps * cfg_cutoff)
                and getattr(pipe, "do_classifier_free_guidance", False)):
            out |= guidance_off(pipe, tensors | out)
        return out

    def _withdraw(pipe, tensors: dict) -> dict:
        gone = set(withdrawn()) & set(rows.live)
        if not gone or (not shrink_rows and len(gone) < len(rows.live)):
            return {}
        if len(gone) == len(rows.live):
            rows.drop(gone)
            pipe._interrupt = True  # diffusers' own flag: the loop skips the remaining steps
            return {}
        return shrink(pipe.scheduler, tensors, rows.drop(gone), generators)

    return callback


def guidance_off(pipe, tensors: dict) -> dict:
    """Stop classifier-free guidance for the rest of the call: keep the conditional half
    (the second) of every input made for both halves (in lists too), and set the
    pipeline's guidance scale to 0, which its loop reads as "no guidance" (one UNet row per
    image from now on)."""
    rows = tensors["latents"].shape[0]
    pipe._guidance_scale = 0.0
    out = {}
    for name, value in tensors.items():
        halves = _per_row(value, 2 * rows)
        if name != "latents" and halves is not None:
            out[name] = halves(lambda v: v[rows:])
    return out


def _per_row(value, rows: int):
    """For a tensor of `rows` rows, or a list of such (the control images of several
    ControlNets): a function applying a row selection to it, or to each; else None."""
    if torch.is_tensor(value):
        return (lambda pick: pick(value)) if value.shape[0] == rows else None
    if isinstance(value, list) and value and all(
            torch.is_tensor(v) and v.shape[0] == rows for v in value):
        return lambda pick: [pick(v) for v in value]
    return None


def shrink(scheduler, tensors: dict, keep: list[int], generators: list) -> dict:
    """Keep only rows `keep` of the latents and of every batch-sized input and state.

    Conditioning tensors with twice the latent rows hold classifier-free guidance's
    unconditional half first, then the conditional half; a list of tensors (the control
    images of several ControlNets) has each shrunk. `generators` is the list the
    pipeline was called with; it is changed in place, as the scheduler holds it.
    """
    latents = tensors["latents"]
    rows = latents.shape[0]
    index = torch.tensor(keep, device=latents.device)
    out = {"latents": latents[index]}
    both = torch.cat([index, index + rows])
    for name, value in tensors.items():
        if name == "latents":
            continue
        if (halves := _per_row(value, 2 * rows)) is not None:
            out[name] = halves(lambda v: v[both])
        elif (single := _per_row(value, rows)) is not None:
            out[name] = single(lambda v: v[index])
    _shrink_scheduler_state(scheduler, latents, index)
    generators[:] = [generators[i] for i in keep]
    return out


def _shrink_scheduler_state(scheduler, latents: torch.Tensor, index: torch.Tensor) -> None:
    """Multistep schedulers keep earlier samples and model outputs (DPM-Solver's
    `model_outputs`, Heun's `sample`, PNDM's `ets`): anything shaped like the latents."""

    def per_sample(value) -> bool:
        return torch.is_tensor(value) and value.shape == latents.shape

    for name, value in list(vars(scheduler).items()):
        if per_sample(value):
            setattr(scheduler, name, value[index.to(value.device)])
        elif isinstance(value, list) and any(per_sample(v) for v in value):
            setattr(scheduler, name, [v[index.to(v.device)] if per_sample(v) else v
                                      for v in value])
