"""`python -m serve.check [FILE]`: a config checked as `serve run` checks it at start (every
field, and the files each path must hold), without Ray, a GPU or loading any weights, so
that a typo in a config for real weights shows in a second rather than after a cluster
start. FILE is an Atelier config, or a Serve config (serve_config.yaml) whose Atelier
applications name theirs in `args` (`config`, a path, or `atelier`, inline); none: the
embedded default.

It prints what each application would serve: each model's names, weights, replicas and
Replicate version (the one clients pin; digests of the weights are kept in the cache
folder, so the server's start reads none again), and the LoRA adapters its folders hold,
with those no served model can load. Exit status 1 and the failing field when the config
is refused, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from serve.adapters import AdapterCatalog
from serve.config import AtelierConfig, ConfigError, ModelConfig, load_config, parse_config
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
        args, name = app.get("args") or {}, f"application {app.get('name', '?')!r}"
        if "atelier" in args:
            yield f"{name} (inline)", parse_config(args["atelier"])
        elif args.get("config"):
            yield f"{name} ({args['config']})", load_config(args["config"])
        else:
            yield f"{name} (the embedded default)", load_config(None)


def model_lines(model: ModelConfig, cache_dir: Path) -> list[str]:
    """What a model serves: its names, weights, what steers it, its replicas and versions."""
    weights = f"embedded {model.embedded}" if model.embedded else str(model.path)
    kind = model.family + (f" ({model.flux_kind})" if model.flux_kind else "") + (
        " inpainting" if model.inpainting else "")
    lines = [(f"{model.id}: {kind}, {weights}, {model.dtype} on {model.device}, "
              f"{model.replicas} replica(s) of {model.gpu_share} GPU")]
    parts = {"aliases": model.aliases, "ControlNets": list(model.controlnets),
             "upscalers": list(model.upscalers), "styles": list(model.styles),
             "IP-Adapter": ["yes", *model.ip_adapter.extra] if model.ip_adapter else [],
             "Redux": ["yes"] if model.redux else [],
             "refiner": ["yes"] if model.refiner else []}
    lines += [f"  {name}: {', '.join(values)}" for name, values in parts.items() if values]
    lines.append("  options: " + (", ".join(o for o, on in model.options().items() if on)
                                  or "none"))
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


def check(path: Path | None) -> list[str]:
    """The report on the config(s) at `path`; raises ConfigError for a refused one."""
    lines = []
    for label, config in configs_in(path):
        config.check_paths()
        lines.append(f"{label}: ok, {len(config.models)} model(s)")
        for model in config.models:
            lines += model_lines(model, config.cache_dir)
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
