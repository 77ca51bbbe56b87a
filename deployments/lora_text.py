"""The text-encoder parts of LoRA adapters, applied while a request's prompt is encoded.

Many adapters (kohya's `lora_te1_`/`lora_te2_` keys, diffusers' `text_encoder.` and
`text_encoder_2.` ones) change the text encoders too, and their style words mean little
without that part. A replica encodes each request's prompt on its own before the call
(`deployments.engines.prompts`), so these parts need no slots: while one prompt is being
encoded, each targeted linear layer of the encoders adds `scale * alpha/rank * B @ A @ x`
for the request's adapters, as diffusers' LoRA layers would. The terms live in a
thread-local, so encodings on other threads (the refiner's, on the pipeline thread) see
the plain encoders, and nothing is injected into the encoders.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from deployments.lora_scales import Scaling, plain_scaling, refuse_other_variants
from serve.adapters import AdapterInvalid, AdapterSet

# encoder name ("text_encoder", "text_encoder_2") → linear layer path → (A, B, alpha/rank)
TextLayers = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
# The adapters of a request whose text-encoder parts apply, with their scales.
TextTag = tuple[tuple[str, float], ...]


def text_layers(state: Mapping[str, torch.Tensor], alphas: Mapping | None,
                encoders: Mapping[str, nn.Module], name: str, max_rank: int,
                scalings: Mapping[str, Scaling] | None = None) -> TextLayers:
    """The encoders' LoRA pairs in a family reader's state dict (keys prefixed with the
    encoder's name), checked against the encoders' linear layers and staged on the CPU
    (pinned for an encoder on a GPU). `scalings` gives an encoder's factors where the
    file's metadata sets them (`deployments.lora_scales`). `name` labels the adapter in
    messages. Raises AdapterInvalid."""
    found: TextLayers = {}
    for prefix, encoder in encoders.items():
        lead = f"{prefix}."
        own = {k.removeprefix(lead): v for k, v in state.items() if k.startswith(lead)}
        if own:
            alpha_of = {k.removeprefix(lead).removesuffix(".alpha"): float(v)
                        for k, v in (alphas or {}).items() if k.startswith(lead)}
            scale = (scalings or {}).get(prefix, plain_scaling)
            found[prefix] = _pairs(own, alpha_of, scale, encoder,
                                   f"adapter {name} ({prefix})", max_rank)
    return found


def _pairs(own: Mapping[str, torch.Tensor], alpha_of: Mapping[str, float], scale: Scaling,
           encoder: nn.Module, label: str, max_rank: int) -> dict:
    """One encoder's (A, B, alpha/rank) by layer path, from its keys in any layout
    diffusers' text-encoder loader reads (old diffusers, PEFT; kohya comes converted)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    try:  # renamed keys → the keys they came from (so alphas follow their layers)
        renamed = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            {k: k for k in own}))
    except ValueError as exc:
        raise AdapterInvalid(f"{label} is not a LoRA diffusers can read: {exc}") from None
    refuse_other_variants(renamed, label)
    modules, weight = dict(encoder.named_modules()), next(encoder.parameters())
    pairs = {}
    for key, source in renamed.items():
        if ".lora_A." not in key:
            continue
        named = key.split(".lora_A.")[0]  # the file's patterns match this name
        path = _layer_path(named, modules)
        if path in pairs:
            raise AdapterInvalid(f"{label} changes {path} twice, under two names")
        layer = modules.get(path)
        b_source = renamed.get(key.replace(".lora_A.", ".lora_B."))
        if not isinstance(layer, nn.Linear) or b_source is None:
            raise AdapterInvalid(f"{label} changes {path}, which is not a linear layer of "
                                 "this model's text encoder")
        a, b = own[source], own[b_source]
        rank = a.shape[0]
        if (a.ndim != 2 or rank > max_rank or a.shape[1] != layer.in_features
                or b.shape != (layer.out_features, rank)):
            raise AdapterInvalid(f"{label} does not fit this model at {path}")
        a, b = a.to(weight.dtype), b.to(weight.dtype)
        if weight.is_cuda:
            a, b = a.pin_memory(), b.pin_memory()
        pairs[path] = (a, b, scale(named, rank, alpha_of.get(source)))
    return pairs


def _layer_path(named: str, modules: Mapping[str, nn.Module]) -> str:
    """The encoder's layer that a file's name means. CLIP's inner model (`text_model.`)
    is in transformers 4's CLIPTextModel and in CLIPTextModelWithProjection, not in
    transformers 5's CLIPTextModel, so a file written under one version may name it where
    the encoder loaded under the other has none, or leave it out where it has one."""
    bare = named.removeprefix("text_model.")
    return next((path for path in (named, bare, f"text_model.{bare}") if path in modules),
                named)


class TextAdapters:
    """The text-encoder parts of up to `capacity` adapters on the device, and the hooks
    that add them while a prompt is encoded (`applied`). `read(name)` gives an adapter's
    parts when they are not held (read again after they left); safe from any thread."""

    def __init__(self, encoders: Mapping[str, nn.Module], read: Callable[[str], TextLayers],
                 capacity: int):
        self._modules = {prefix: dict(encoder.named_modules())
                         for prefix, encoder in encoders.items()}
        self._devices = {prefix: next(encoder.parameters()).device
                         for prefix, encoder in encoders.items()}
        self._read, self._capacity = read, max(1, capacity)
        self._held: OrderedDict[str, TextLayers] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._hooked: set[nn.Module] = set()

    def hold(self, name: str, layers: TextLayers) -> TextLayers:
        """Keep `name`'s staged parts (none: it changes no encoder) on the encoders'
        device, dropping the least recently used beyond `capacity`; return them."""
        moved = {}
        for prefix, pairs in layers.items():
            device = self._devices[prefix]
            moved[prefix] = {path: (a.to(device, non_blocking=True),
                                    b.to(device, non_blocking=True), alpha)
                             for path, (a, b, alpha) in pairs.items()}
        with self._lock:
            self._hook(moved)
            self._held[name] = moved
            self._held.move_to_end(name)
            while len(self._held) > self._capacity:
                self._held.popitem(last=False)
        return moved

    def tag(self, adapters: AdapterSet) -> TextTag:
        """The adapters of `adapters` that change prompt embeddings, with their scales:
        prompts encoded under equal tags have equal embeddings."""
        if not self._modules:
            return ()
        return tuple((name, scale) for name, scale in adapters.items
                     if scale != 0 and self._parts(name))

    @contextmanager
    def applied(self, tag: TextTag) -> Iterator[None]:
        """Encode with `tag`'s adapters added, on this thread only."""
        terms: dict[nn.Module, list] = {}
        for name, scale in tag:
            for prefix, pairs in self._parts(name).items():
                for path, (a, b, alpha) in pairs.items():
                    terms.setdefault(self._modules[prefix][path], []).append(
                        (a, b, scale * alpha))
        self._local.terms = terms
        try:
            yield
        finally:
            self._local.terms = None

    def _hook(self, layers: TextLayers) -> None:
        """Put the hook on each layer of `layers` that has none. Only layers some adapter
        changed carry one (an encoder no adapter touches runs as it is), and a hook stays
        once put: an encoding under way on another thread may still need it."""
        for prefix, pairs in layers.items():
            for path in pairs:
                layer = self._modules[prefix][path]
                if layer not in self._hooked:
                    layer.register_forward_hook(self._add_terms)
                    self._hooked.add(layer)

    def _parts(self, name: str) -> TextLayers:
        with self._lock:
            if name in self._held:
                self._held.move_to_end(name)
                return self._held[name]
        return self.hold(name, self._read(name))

    def _add_terms(self, layer: nn.Module, args: tuple, output: torch.Tensor):
        terms = getattr(self._local, "terms", None)
        if not terms or layer not in terms:
            return None
        x = args[0]
        for a, b, factor in terms[layer]:
            output = output + factor * ((x @ a.t()) @ b.t())
        return output
