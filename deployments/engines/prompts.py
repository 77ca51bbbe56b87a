"""Prompt embeddings made before the pipeline call.

A replica encodes each request's prompt when the request arrives, on a thread of its own,
while the running call denoises; the call then only stacks the embeddings. Prompts used
recently are kept, so a repeated prompt (variations of one product, retries) skips the
text encoders altogether. A request whose adapters change the text encoders
(`deployments.lora_text`) is encoded with them, and held apart from the same prompt
without them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from deployments.lora_text import TextAdapters
from serve.types import GenerationRequest

# One image's embeddings (each tensor with a batch dimension of 1), in the order of the
# engine's `embed_names`.
Embeds = tuple[torch.Tensor, ...]
PromptKey = tuple[str, str, int, tuple]


class PromptCache:
    """Embeddings by (prompt, negative prompt, the text encoders' layer read, the
    adapters that change the text encoders with their scales), the `entries` most
    recently used kept; `encode(prompt, negative prompt, clip_skip)` makes them.
    `adapters`: where those adapters' text-encoder parts are (none: no adapter changes
    them).

    Safe to call from several threads: encoding is serialised (fast tokenizers refuse
    concurrent use), and a prompt being encoded by one thread is found by the next.
    """

    def __init__(self, encode: Callable[[str, str, int], Embeds], entries: int = 64,
                 adapters: TextAdapters | None = None):
        if entries < 1:
            raise ValueError("entries must be >= 1")
        self._encode, self._entries, self._adapters = encode, entries, adapters
        self._held: OrderedDict[PromptKey, Embeds] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request: GenerationRequest) -> tuple[Embeds, bool]:
        """The request's embeddings, and whether they were already held."""
        with self._lock:
            tag = self._adapters.tag(request.adapters) if self._adapters else ()
            key = (request.prompt, request.negative_prompt, request.clip_skip, tag)
            if key in self._held:
                self._held.move_to_end(key)
                return self._held[key], True
            with self._adapters.applied(tag) if tag else nullcontext():
                embeds = self._encode(request.prompt, request.negative_prompt,
                                      request.clip_skip)
            self._held[key] = embeds
            if len(self._held) > self._entries:
                self._held.popitem(last=False)
            return embeds, False


def stack(names: Sequence[str], requests: Sequence[GenerationRequest],
          prompts: Sequence[Embeds]) -> dict[str, torch.Tensor]:
    """The call's pipeline inputs: each request's embeddings once per image it asks for."""
    return {name: torch.cat([p[i].repeat_interleave(r.num_outputs, dim=0)
                             for r, p in zip(requests, prompts, strict=True)])
            for i, name in enumerate(names)}
