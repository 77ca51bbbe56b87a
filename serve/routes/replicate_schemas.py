"""Which Replicate inputs a served model takes (`stability-ai/sdxl`'s, or one of the FLUX
models'), their JSON schema, and the parsing of a create body's `input`."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from serve.canvases import finds_edges
from serve.config import ModelConfig
from serve.model_extras import BICUBIC
from serve.routes.replicate_flux import (
    CannyInput,
    DepthInput,
    FillInput,
    FluxInput,
    KontextInput,
)
from serve.routes.replicate_inputs import CannyEdgeInputs, ControlNetInputs, SDXLInput
from serve.routes.replicate_upscale import RealEsrganInput

ReplicateInput = (SDXLInput | FluxInput | KontextInput | FillInput | CannyInput | DepthInput
                  | RealEsrganInput)


def input_class(model: ModelConfig, name: str | None = None) -> type[ReplicateInput]:
    """The inputs the model takes under `name` (one of its ids): real-esrgan's under an
    upscaling alias, else its family's."""
    if name in model.upscaling_aliases:
        return RealEsrganInput
    if model.flux_kind is not None:
        return {"kontext": KontextInput, "fill": FillInput, "canny": CannyInput,
                "depth": DepthInput}[model.flux_kind]
    return FluxInput if model.family == "flux" else SDXLInput


def single_output(model: ModelConfig, name: str | None = None) -> bool:
    """Whether the model's predictions (under `name`) output one file URL rather than a
    list, as flux-kontext-dev's and real-esrgan's (one image per prediction) do."""
    return model.kontext or name in model.upscaling_aliases


def parse_input(model: ModelConfig, raw: dict, name: str | None = None) -> ReplicateInput:
    """The create body's `input`, validated against the model's inputs under `name`; a
    bad field is a 422 located at input.<field>."""
    cls = input_class(model, name)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "input", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


_IP_ADAPTER_INPUTS = ("ip_adapter_image", "ip_adapter_scale")
_REDUX_INPUTS = ("redux_image", "redux_downsampling")
_FLUX_CONTROLNET_INPUTS = ("control_image", "control_type", "control_strength")
# GET /v1/models' options → their inputs.
_OPTION_INPUTS = {"tiling": ("tiling",),
                  "hires": ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler"),
                  "variations": ("variation_seed", "variation_strength"),
                  "upscale": ("upscale", "upscaler")}
# The inputs naming an upscaler → what they are for.
_UPSCALER_INPUTS = {"hires_upscaler": "What upscales the images before the hires pass "
                                      "redraws them",
                    "upscaler": "What enlarges the finished images (with upscale)"}


def input_schema(model: ModelConfig, name: str | None = None) -> dict:
    """The model's input schema; a model without ControlNets shows no ControlNet inputs,
    one that finds no Canny edges no edge thresholds, a model without an IP-Adapter or
    without Redux not their image prompt inputs, one without styles no `style` (it refuses
    them), nor the inputs of options it does not take (tiling, the hires pass, seed
    variations); a model's styles are the values `style` takes. Under an upscaling alias:
    real-esrgan's."""
    if name in model.upscaling_aliases:
        return RealEsrganInput.model_json_schema()
    schema = input_class(model).model_json_schema()
    hidden: set[str] = set()
    if model.family == "sdxl" and not model.controlnets:
        hidden |= set(ControlNetInputs.model_fields)
    if input_class(model) is FluxInput and not model.controlnets:
        hidden |= set(_FLUX_CONTROLNET_INPUTS)
    if not finds_edges(model):
        hidden |= set(CannyEdgeInputs.model_fields)
    if model.ip_adapter is None:
        hidden |= set(_IP_ADAPTER_INPUTS)
    if model.ip_adapter is None or model.family != "sdxl":
        hidden |= {"ip_adapter_mask", "ip_adapter_blocks"}
    if not model.extra_ip_adapters:
        hidden.add("extra_ip_adapters")
    if model.family == "flux" and model.redux is None:
        hidden |= set(_REDUX_INPUTS)
    hidden |= {name for option, taken in model.options().items() if not taken
               for name in _OPTION_INPUTS[option]}
    if not model.styles:
        hidden.add("style")
    else:
        schema["properties"]["style"] = {"title": "Style", "enum": list(model.styles),
                                         "description": "One of the model's styles"}
    for field, description in _UPSCALER_INPUTS.items():  # the model's, its first default
        if field in schema["properties"]:
            schema["properties"][field] = {
                "title": field.replace("_", " ").title(), "enum": [*model.upscalers, BICUBIC],
                "default": next(iter(model.upscalers), BICUBIC), "description": description}
    if input_class(model) is FluxInput and model.redux is None:  # a prompt is then needed
        schema["required"] = sorted({*schema.get("required", []), "prompt"})
    schema["properties"] = {name: spec for name, spec in schema["properties"].items()
                            if name not in hidden}
    return schema
