from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "serve" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_model_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.models and all(m.path is not None for m in cfg.models)


def test_serve_config_is_valid_for_serve_and_binds_to_loopback():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert schema.http_options.host == "127.0.0.1"
    assert schema.http_options.request_timeout_s > 0
    assert schema.applications[0].import_path == "serve.app:build_app"


def test_the_commented_models_in_a_shipped_config_are_valid_once_uncommented():
    """sdxl-flux-gpu.yaml's FLUX.1 Kontext, Fill, Canny and Depth entries, as a user would
    uncomment them."""
    import re

    from serve.config import ModelConfig

    text = (ROOT / "serve" / "configs" / "sdxl-flux-gpu.yaml").read_text()
    blocks = re.findall(r"^  # (- id: .*\n)((?:  #   .*\n)+)", text, re.MULTILINE)
    models = [ModelConfig.model_validate(yaml.safe_load(
        head + "".join(line[4:] + "\n" for line in body.splitlines()))[0])
        for head, body in blocks]
    assert [(m.id, m.family, m.flux_kind, m.defaults.guidance_scale) for m in models] == [
        ("black-forest-labs/flux-kontext-dev", "flux", "kontext", 2.5),
        ("black-forest-labs/flux-fill-dev", "flux", "fill", 30),
        ("black-forest-labs/flux-canny-dev", "flux", "canny", 30),
        ("black-forest-labs/flux-depth-dev", "flux", "depth", 10)]
    assert str(models[-1].depth_estimator.path) == "/models/depth-anything"


def test_the_commented_redux_of_the_shipped_flux_model_is_valid_once_uncommented():
    from serve.config import ModelConfig

    data = yaml.safe_load((ROOT / "serve" / "configs" / "sdxl-flux-gpu.yaml").read_text())
    flux = next(m for m in data["models"] if m["family"] == "flux")
    text = (ROOT / "serve" / "configs" / "sdxl-flux-gpu.yaml").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("    # redux: ")]
    model = ModelConfig.model_validate(flux | yaml.safe_load(line.replace("# ", "", 1)))
    assert (model.id, str(model.redux.path)) == ("black-forest-labs/flux-dev",
                                                 "/models/flux-redux-dev")


def test_the_commented_controlnets_of_the_shipped_flux_model_are_valid_once_uncommented():
    from serve.config import ModelConfig

    text = (ROOT / "serve" / "configs" / "sdxl-flux-gpu.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("    # controlnets:")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("    #   "):
            break
        block.append(line)
    flux = next(m for m in yaml.safe_load(text)["models"] if m["family"] == "flux")
    uncommented = "\n".join(line.replace("# ", "", 1) for line in block)
    model = ModelConfig.model_validate(flux | yaml.safe_load(uncommented))
    assert {name: (str(net.path), net.control_mode, net.preprocess)
            for name, net in model.controlnets.items()} == {
        "canny": ("/models/flux-controlnet-union", 0, "canny"),
        "depth": ("/models/flux-controlnet-union", 2, "none")}
