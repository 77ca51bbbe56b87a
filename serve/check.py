"""`python -m serve.check [FILE]`: a config checked as `serve run` checks it at start (every
field, and the files each path must hold), without Ray, a GPU or loading any weights, so
that a typo in a config for real weights shows in a second rather than after a cluster
start. FILE is an Atelier config, or a Serve config (serve_config.yaml) whose Atelier
applications name theirs in `args` (`config`, a path, or `atelier`, inline); none: the
embedded default.

It prints what each application would serve: each model's names, weights, replicas and
Replicate version (the one clients pin; digests of the weights are kept in the cache
folder, so the server's start reads none again), the GPUs its replicas reserve by type,
and the LoRA adapters its folders hold,
with those no served model can load. Exit status 1 and the failing field when the config
is refused, 0 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from serve.adapters import AdapterCatalog, safetensors_header
from serve.config import (
    AtelierConfig,
    ConfigError,
    ModelConfig,
    app_config,
    load_config,
    parse_config,
)
from serve.versions import upscaling_version, version_id

_APP = "serve.app:build_app"  # the import path of Atelier's applications


def configs_in(path: Path | None) -> Iterator[tuple[str, AtelierConfig]]:
    """(label, config) of each Atelier config `path` holds: itself, or those a Serve
    config's Atelier applications name; the embedded default for None. Raises
    ConfigError as the server's start does."""
    if path is None:
        yield "the embedded default", load_config(None)
        return
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not (isinstance(data, dict) and "applications" in data):
        yield str(path), parse_config(data)
        return
    apps = [a for a in data["applications"] or () if a.get("import_path") == _APP]
    if not apps:
        raise ConfigError(f"{path}: no application runs {_APP}")
    for app in apps:
        args = app.get("args") or {}
        source = ("inline" if "atelier" in args else args.get("config")
                  or "the embedded default")
        yield f"application {app.get('name', '?')!r} ({source})", app_config(args)


# The modules of a family's pipeline that hold its weights, as diffusers lays them out.
_MODULES = {"sdxl": ("unet", "text_encoder", "text_encoder_2", "vae"),
            "flux": ("transformer", "text_encoder", "text_encoder_2", "vae")}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _parameters(files: list[Path]) -> int:
    """How many numbers the safetensors `files` hold."""
    count = 0
    for file in files:
        for name, tensor in safetensors_header(file).items():
            if name != "__metadata__":
                count += math.prod(tensor["shape"])
    return count


def _module_files(folder: Path, variant: str | None) -> list[Path]:
    """A diffusers module folder's weights files of `variant` (sharded ones included), as
    from_pretrained picks them."""
    def variant_of(file: Path) -> str | None:
        parts = file.name.removesuffix(".safetensors").split(".")
        return parts[1].split("-")[0] if len(parts) > 1 else None

    return sorted(f for f in folder.glob("*.safetensors") if variant_of(f) == variant)


def weight_bytes(model: ModelConfig) -> dict[str, int]:
    """What the base model's weights take in its dtype, by module, read from its files'
    headers (a diffusers folder: its variant's files; a single file: the file, with a
    FLUX file's other modules from `configs_from`). Empty for an embedded model."""
    if model.path is None:
        return {}
    counts = {}
    for module in _MODULES[model.family]:
        if model.path.is_file() and (model.family == "sdxl" or module == "transformer"):
            counts[model.path.name] = _parameters([model.path])
            continue
        folder = (model.configs_from if model.path.is_file() else model.path) / module
        counts[module] = _parameters(_module_files(folder, model.variant))
    return {name: count * _DTYPE_BYTES[model.dtype] for name, count in counts.items()}


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def weight_lines(model: ModelConfig) -> list[str]:
    sizes = weight_bytes(model)
    if not sizes:
        return []
    parts = ", ".join(f"{name} {_size(n)}" for name, n in sizes.items())
    return [(f"  weights: {_size(sum(sizes.values()))} in {model.dtype} ({parts}); "
             "ControlNets, adapters and upscalers come on top")]


def _replicas(model: ModelConfig) -> str:
    fewest, most = model.replica_range
    if model.autoscaling is None:
        return f"{most} replica(s)"
    return f"{fewest} to {most} replicas (autoscaled)"


def model_lines(model: ModelConfig, cache_dir: Path) -> list[str]:
    """What a model serves: its names, weights, what steers it, its replicas and versions."""
    weights = f"embedded {model.embedded}" if model.embedded else str(model.path)
    kind = model.family + (f" ({model.flux_kind})" if model.flux_kind else "") + (
        " inpainting" if model.inpainting else "")
    lines = [(f"{model.id}: {kind}, {weights}, {model.dtype} on {model.device}, "
              f"{_replicas(model)} of {model.gpu_share} GPU"
              + (f" ({model.accelerator_type})" if model.accelerator_type else ""))]
    parts = {"aliases": model.aliases, "ControlNets": list(model.controlnets),
             "upscalers": list(model.upscalers), "styles": list(model.styles),
             "IP-Adapter": ["yes", *model.ip_adapter.extra] if model.ip_adapter else [],
             "Redux": ["yes"] if model.redux else [],
             "refiner": ["yes"] if model.refiner else []}
    lines += [f"  {name}: {', '.join(values)}" for name, values in parts.items() if values]
    lines.append("  options: " + (", ".join(o for o, on in model.options().items() if on)
                                  or "none"))
    lines += weight_lines(model)
    version = version_id(model, cache_dir)
    lines.append(f"  version {version}")
    lines += [f"  {alias}: version {upscaling_version(version, alias)} (real-esrgan's inputs)"
              for alias in model.upscaling_aliases]
    return lines


def adapter_lines(config: AtelierConfig) -> list[str]:
    """The LoRA adapters of the config's folders, with the ones no served model loads.
    The embedded demo folders are built at the server's start: only named here."""
    folders = [(f.path, f.base, f.default_scale) for f in config.lora_folders if f.path]
    lines = [f"LoRA folder: embedded {f.embedded} (built at start)"
             for f in config.lora_folders if f.embedded]
    catalog = AdapterCatalog.scan(folders)
    lines.append(f"LoRA adapters in folders: {len(catalog.entries)}")
    for entry in catalog.entries.values():
        problems = [entry.problem_with(m) for m in config.models]
        if all(problems):  # why the models of its base cannot load it, else its base's
            fits = [p for p, m in zip(problems, config.models, strict=True)
                    if entry.base in (m.id, m.family, *m.aliases)]
            lines.append(f"  unusable: {(fits or problems)[0]}")
    return lines


def gpu_line(config: AtelierConfig) -> str:
    """The GPUs the models' replicas reserve, at start and at most (autoscaled), by the
    type each asks for: what the cluster must have. Models on `auto` count, as they take
    GPUs on a cluster that has them; shares are summed (two of 0.5 fit on one GPU)."""
    need: dict[str, list[float]] = {}
    for model in config.models:
        if model.device != "cpu":
            fewest, most = model.replica_range
            kind = need.setdefault(model.accelerator_type or "any type", [0.0, 0.0])
            kind[0] += fewest * model.gpu_share
            kind[1] += most * model.gpu_share
    if not need:
        return "GPUs: none (every model on cpu)"
    start, most = (sum(counts[i] for counts in need.values()) for i in (0, 1))
    kinds = "; ".join(f"{kind}: {a:g}" + ("" if a == b else f" to {b:g}")
                      for kind, (a, b) in need.items())
    return (f"GPUs the replicas reserve on a cluster with GPUs: {start:g} at start, "
            f"{most:g} at most ({kinds})")


def check(path: Path | None) -> list[str]:
    """The report on the config(s) at `path`; raises ConfigError for a refused one."""
    lines = []
    for label, config in configs_in(path):
        config.check_paths()
        lines.append(f"{label}: ok, {len(config.models)} model(s)")
        for model in config.models:
            lines += model_lines(model, config.cache_dir)
        lines.append(gpu_line(config))
        lines += adapter_lines(config)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.check", description=(
        "Check an Atelier config (or a Serve config naming one) as the server's start "
        "does, without starting it."))
    parser.add_argument("file", nargs="?", type=Path, help=(
        "Atelier config or Serve config YAML; none: the embedded default"))
    try:
        lines = check(parser.parse_args(argv).file)
    except ConfigError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
