"""The checks a model's configuration passes as a whole, once each field has passed its
own (`ModelConfig`): names, which weights and tool, the parts that steer or enlarge, and
the serving settings; each failure names the setting at fault."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from serve.model_extras import BICUBIC
from serve.model_parts import FAMILIES, FLUX_TOOLS, AutoscalingConfig
from serve.steering import EMBEDDED_CONTROLNETS, EMBEDDED_IP_ADAPTERS

if TYPE_CHECKING:
    from serve.model_config import ModelConfig

MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")
# An alias may also be a bare name, as OpenAI's clients name models (dall-e-3, gpt-image-1).
BARE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
VERSION_ID = re.compile(r"^[0-9a-f]{64}$")  # a Replicate version's


def check_names(model: ModelConfig) -> None:
    """The id, aliases and pinned Replicate versions."""
    for name in (model.id, *model.upscaling_aliases):
        if not MODEL_ID.match(name):
            raise ValueError(f"model id {name!r} is not in lowercase owner/name form")
    for name in model.aliases:
        if not (MODEL_ID.match(name) or BARE_NAME.match(name)) or name in FAMILIES:
            raise ValueError(f"alias {name!r} is neither a lowercase owner/name id nor a "
                             "bare lowercase name other than a family's (sdxl, flux)")
    for ref in model.replicate_versions:
        name, _, version = ref.rpartition(":")
        if name not in model.names or not VERSION_ID.match(version):
            raise ValueError(f"replicate_versions: {ref!r} is not one of this model's "
                             "names (id, alias or upscaling alias), ':' and a version id "
                             "of 64 hex digits")
    if model.upscaling_aliases and not (model.upscalers and model.options()["upscale"]):
        raise ValueError("upscaling_aliases: the model needs an upscaler (upscalers) to "
                         "enlarge images with")


def check_weights(model: ModelConfig) -> None:
    """Where the weights come from, and which family's and FLUX.1 tool's they are."""
    if (model.path is None) == (model.embedded is None):
        raise ValueError("set exactly one of path or embedded")
    tools = [name for name in FLUX_TOOLS if getattr(model, name)]
    if tools and model.family != "flux":
        raise ValueError(f"{tools[0]}: only flux models are {tools[0].title()} models")
    if len(tools) > 1:
        raise ValueError(f"{tools[1]}: a model is one FLUX.1 tool, not "
                         f"{' and '.join(tools)}")
    _check_sdxl_only(model)
    if model.embedded not in (None, model.rules.embedded):
        kind = (model.flux_kind or "").title() or ("inpainting" if model.inpainting else "")
        kind = f"{model.family}{f' {kind}' if kind else ''} model"
        hint = {f"tiny-{model.family}-{tool}": f"; set {tool}: true"
                for tool in (*FLUX_TOOLS, "inpainting")}.get(model.embedded or "", "")
        raise ValueError(f"embedded {model.embedded!r} is not a {kind}{hint}")
    if model.configs_from is not None and model.path is None:
        raise ValueError("configs_from: only a single-file path takes it")
    if model.configs_from is not None and model.variant is not None:
        raise ValueError("variant: a single-file checkpoint has no variants")


def check_parts(model: ModelConfig) -> None:
    """Styles, embeddings, ControlNets, IP-Adapter and Redux, depth estimator, upscalers."""
    for name, style in model.styles.items():
        if style.negative_prompt and not model.rules.negative_prompt:
            raise ValueError(f"styles.{name}.negative_prompt: FLUX models take no "
                             "negative prompt")
    tokens = [embedding.token for embedding in model.textual_inversions]
    if len(set(tokens)) < len(tokens):
        raise ValueError("textual_inversions: each embedding needs its own token")
    _check_controlnets(model)
    _check_ip_adapter(model)
    if model.estimates_depth != (model.depth_estimator is not None):
        raise ValueError("depth_estimator: a Depth model and a model with a ControlNet "
                         "that preprocesses depth need one, and only they take one")
    if BICUBIC in model.upscalers:
        raise ValueError(f"upscalers.{BICUBIC}: the built-in upscaler's name")
    if model.upscalers and not model.options()["upscale"]:
        raise ValueError("upscalers: this model runs no hires pass and enlarges no "
                         "images (the FLUX.1 tools)")
    if model.redux is not None and model.family != "flux":
        raise ValueError("redux: only flux models take FLUX.1 Redux")


def check_serving(model: ModelConfig) -> None:
    """Defaults within limits, batches that can fill, devices, autoscaling."""
    model.defaults.check_within(model.limits, model.rules)
    if model.limits.max_loras > model.max_loaded_adapters:
        raise ValueError("limits.max_loras must not exceed max_loaded_adapters")
    buckets = model.speed.batch_buckets
    if buckets and buckets[-1] < model.batching.max_batch_size:
        raise ValueError("speed.batch_buckets must hold batching.max_batch_size")
    if model.max_ongoing_requests < model.batching.max_batch_size:
        raise ValueError("max_ongoing_requests must be at least batching.max_batch_size, "
                         "or batches can never fill")
    if model.device == "cpu" and model.gpu_share != 1:
        raise ValueError("gpu_share: a replica on device cpu takes no GPU")
    if model.device == "cpu" and model.accelerator_type is not None:
        raise ValueError("accelerator_type: a replica on device cpu takes no GPU")
    if model.autoscaling is not None:
        _check_autoscaling(model, model.autoscaling)


def _check_autoscaling(model: ModelConfig, autoscaling: AutoscalingConfig) -> None:
    if model.replicas != 1:  # (1: unset)
        raise ValueError("replicas: an autoscaled model's replicas are "
                         "autoscaling.min_replicas to max_replicas; leave it unset")
    target = autoscaling.ray_config(model.batching.max_batch_size)["target_ongoing_requests"]
    if target >= model.max_ongoing_requests:
        raise ValueError(
            f"autoscaling.target_ongoing_requests ({target:g}) must be under "
            f"max_ongoing_requests ({model.max_ongoing_requests}): replicas hold no more "
            "than that, so the autoscaler would never see more than its target")


def _check_sdxl_only(model: ModelConfig) -> None:
    """Refuse on a FLUX model, naming it, each setting only SDXL models take."""
    if model.family == "sdxl":
        return
    guided = "only sdxl models use classifier-free guidance"
    settings = {
        "inpainting": (model.inpainting, ("only sdxl models take an inpainting UNet "
                                          "(FLUX.1 Fill's weights: fill)")),
        "freeu": (model.freeu is not None, "only sdxl models have a UNet to re-weight"),
        "prompts": (model.prompts.given(), ("FLUX's T5 encoder reads long prompts "
                                            "whole and takes no weights")),
        "textual_inversions": (model.textual_inversions,
                               "only sdxl models take these embeddings"),
        "refiner": (model.refiner is not None, "only sdxl models take a refiner"),
        "scheduler_options": (model.scheduler_options.given(),
                              "FLUX's flow-matching scheduler takes none"),
        "speed.cfg_cutoff": (model.speed.cfg_cutoff is not None, guided),
        "defaults.guidance_rescale": (model.defaults.guidance_rescale, guided)}
    for name, (given, reason) in settings.items():
        if given:
            raise ValueError(f"{name}: {reason}")


def _check_controlnets(model: ModelConfig) -> None:
    if model.controlnets and model.flux_kind:
        raise ValueError(f"controlnets: a FLUX.1 {model.flux_kind.title()} model takes no "
                         "ControlNets (plain FLUX models do)")
    for name, net in model.controlnets.items():
        family = net.embedded and EMBEDDED_CONTROLNETS[net.embedded][0]
        if family not in (None, model.family):
            raise ValueError(f"controlnets.{name}.embedded: {net.embedded!r} is a {family} "
                             f"ControlNet, and this is a {model.family} model")


def _check_ip_adapter(model: ModelConfig) -> None:
    adapter = model.ip_adapter
    if adapter is None:
        return
    if model.flux_kind:
        raise ValueError(f"ip_adapter: a FLUX.1 {model.flux_kind.title()} model takes no "
                         "IP-Adapter (sdxl and plain flux models do)")
    if model.redux is not None:
        raise ValueError("ip_adapter: a FLUX model reads its image prompts through Redux "
                         "or an IP-Adapter, not both")
    family = adapter.embedded and EMBEDDED_IP_ADAPTERS[adapter.embedded]
    if family not in (None, model.family):
        raise ValueError(f"ip_adapter.embedded: {adapter.embedded!r} is a {family} "
                         f"IP-Adapter, and this is a {model.family} model")
    if adapter.extra and model.family != "sdxl":
        raise ValueError("ip_adapter.extra: a FLUX model reads one IP-Adapter (SDXL "
                         "models may hold several)")
