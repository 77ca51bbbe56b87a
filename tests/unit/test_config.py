import re
import shutil
from pathlib import Path

import pytest

from serve.config import (
    OPENAI_IMAGE_MODELS,
    ConfigError,
    default_config,
    load_config,
    parse_config,
)


def _model(**overrides):
    return {"id": "acme/sdxl", "embedded": "tiny-sdxl", **overrides}


def test_default_config_serves_the_embedded_tiny_sdxl_and_flux_under_their_aliases():
    cfg = default_config()
    assert [m.id for m in cfg.models] == ["atelier/tiny-sdxl", "atelier/tiny-flux"]
    sdxl, flux = cfg.models
    assert (sdxl.family, sdxl.embedded, sdxl.default_scheduler) == ("sdxl", "tiny-sdxl",
                                                                     "K_EULER")
    assert (flux.family, flux.embedded, flux.default_scheduler) == ("flux", "tiny-flux",
                                                                    "FlowMatchEuler")
    assert "stability-ai/sdxl" in sdxl.aliases
    assert "black-forest-labs/flux-dev" in flux.aliases


@pytest.mark.parametrize("model, field", [
    (_model(dtype="float8"), "models.0.dtype"),
    (_model(replicas=0), "models.0.replicas"),
    (_model(batching={"max_batch_size": 0}), "models.0.batching.max_batch_size"),
    (_model(limits={"max_steps": -1}), "models.0.limits.max_steps"),
    (_model(colour="red"), "models.0.colour"),
    (_model(family="sd15"), "models.0.family"),
    (_model(gpu_share=0), "models.0.gpu_share"),
    (_model(gpu_share=1.5), "models.0.gpu_share"),
    (_model(accelerator_type="RTX PRO 6000"), "models.0.accelerator_type"),
])
def test_invalid_field_is_named_in_the_error(model, field):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [model]})
    assert field in str(err.value)


@pytest.mark.parametrize("model, text", [
    (_model(id="NoSlash"), "owner/name"),
    (_model(path="/x"), "exactly one of path or embedded"),
    ({"id": "acme/sdxl"}, "exactly one of path or embedded"),
    (_model(max_ongoing_requests=2, batching={"max_batch_size": 8}), "max_ongoing_requests"),
    (_model(defaults={"scheduler": "LMS"}), "scheduler must be one of"),
    (_model(defaults={"width": 1001}), "defaults.width must be a multiple of 8"),
    (_model(family="flux", embedded="tiny-flux", defaults={"width": 520}),
     "defaults.width must be a multiple of 16"),
    (_model(family="flux"), "'tiny-sdxl' is not a flux model"),
    (_model(family="flux", embedded="tiny-flux", defaults={"scheduler": "K_EULER"}),
     "scheduler must be one of FlowMatchEuler"),
    (_model(defaults={"width": 4096}, limits={"max_size": 2048}), "defaults.width"),
    (_model(defaults={"num_inference_steps": 80}), "exceeds limits.max_steps"),
    (_model(device="cpu", gpu_share=0.5), "gpu_share: a replica on device cpu takes no GPU"),
    (_model(device="cpu", accelerator_type="H100"),
     "accelerator_type: a replica on device cpu takes no GPU"),
])
def test_inconsistent_model_is_rejected_with_reason(model, text):
    with pytest.raises(ConfigError, match=text):
        parse_config({"models": [model]})


SDXL_VERSION = "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc"


def test_replicate_versions_client_code_pins_run_on_the_model_they_name():
    cfg = parse_config({"models": [_model(aliases=["stability-ai/sdxl"], replicate_versions=[
        f"stability-ai/sdxl:{SDXL_VERSION}", f"acme/sdxl:{'0' * 64}"])]})
    assert cfg.models[0].pinned_versions == {SDXL_VERSION: "stability-ai/sdxl",
                                              "0" * 64: "acme/sdxl"}
    for bad in (f"acme/other:{SDXL_VERSION}", "acme/sdxl:7762fd07", SDXL_VERSION,
                f"acme/sdxl:{SDXL_VERSION.upper()}"):
        with pytest.raises(ConfigError, match="models.0: .*replicate_versions: .*not one of"):
            parse_config({"models": [_model(replicate_versions=[bad])]})
    with pytest.raises(ConfigError, match=f"version {SDXL_VERSION} is pinned twice"):
        parse_config({"models": [
            _model(replicate_versions=[f"acme/sdxl:{SDXL_VERSION}"]),
            _model(id="acme/b", replicate_versions=[f"acme/b:{SDXL_VERSION}"])]})


def test_an_alias_may_be_a_bare_name_as_openai_names_models():
    cfg = parse_config({"models": [_model(aliases=["dall-e-3", "gpt-image-1.5", "acme/x"])]})
    assert cfg.models[0].aliases == ["dall-e-3", "gpt-image-1.5", "acme/x"]
    for bad in ("sdxl", "flux", "DALL-E-3", "gpt image", "-x"):
        with pytest.raises(ConfigError, match="models.0: .*neither a lowercase owner/name"):
            parse_config({"models": [_model(aliases=[bad])]})
    # A model's own id stays owner/name.
    with pytest.raises(ConfigError, match="owner/name form"):
        parse_config({"models": [_model(id="dall-e-3")]})


def test_the_default_config_serves_openais_model_names_with_its_sdxl():
    sdxl, flux = default_config().models
    assert set(OPENAI_IMAGE_MODELS) <= set(sdxl.aliases)
    assert {"dall-e-2", "dall-e-3", "gpt-image-1"} <= set(OPENAI_IMAGE_MODELS)
    assert not set(OPENAI_IMAGE_MODELS) & set(flux.aliases)


def test_an_alias_may_not_repeat_another_models_id():
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({"models": [_model(), _model(id="acme/other", aliases=["acme/sdxl"])]})


def test_missing_model_path_names_the_field(tmp_path):
    cfg = parse_config({"models": [_model(), {"id": "acme/real", "path": str(tmp_path / "no")}]})
    with pytest.raises(ConfigError, match=r"models\.1\.path: .*does not exist"):
        cfg.check_paths()


def test_a_path_that_is_not_a_diffusers_folder_is_refused(tmp_path):
    cfg = parse_config({"models": [{"id": "acme/real", "path": str(tmp_path)}]})
    with pytest.raises(ConfigError, match=r"models\.0\.path: .*not a diffusers folder"):
        cfg.check_paths()


@pytest.mark.parametrize("file, configs, family, error", [
    ("model.safetensors", None, "sdxl", r"models\.0\.path: .*is a file: .*configs_from"),
    ("model.ckpt", "base", "sdxl", r"models\.0\.path: .*model\.ckpt is a file: only a \.safe"),
    ("model.safetensors", "empty", "sdxl", r"models\.0\.configs_from: .*not a diffusers"),
    ("model.safetensors", "gone", "sdxl", r"models\.0\.configs_from: .*does not exist"),
    ("base", "base", "sdxl", r"models\.0\.configs_from: goes only with a single-file path"),
    ("model.safetensors", "base", "flux",
     (r"models\.0\.configs_from: .*base/vae holds no \.safetensors weights: a flux file "
      r"holds the transformer alone, and its vae, text_encoder, text_encoder_2 are read from")),
    ("model.safetensors", "base-vae", "flux", r"models\.0\.configs_from: .*base-vae/text_encoder "),
])
def test_a_single_file_checkpoint_needs_a_folder_of_configs(tmp_path, file, configs, family,
                                                           error):
    for name in ("model.safetensors", "model.ckpt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    shutil.copytree(tmp_path / "base", tmp_path / "base-vae")
    (tmp_path / "base-vae" / "vae").mkdir()
    (tmp_path / "base-vae" / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    model = {"id": "acme/real", "family": family, "path": str(tmp_path / file)}
    if configs:
        model["configs_from"] = str(tmp_path / configs)
    with pytest.raises(ConfigError, match=error):
        parse_config({"models": [model]}).check_paths()


@pytest.mark.parametrize("family, weights", [
    ("sdxl", ()),  # configs alone
    ("flux", ("vae", "text_encoder", "text_encoder_2"))])
def test_a_single_file_checkpoint_with_its_configs_is_accepted(tmp_path, family, weights):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    for module in weights:
        (tmp_path / "base" / module).mkdir()
        (tmp_path / "base" / module / "model-00001-of-00002.safetensors").write_bytes(b"")
    cfg = parse_config({"models": [{"id": "acme/real", "family": family,
                                    "path": str(tmp_path / "model.safetensors"),
                                    "configs_from": str(tmp_path / "base")}]})
    cfg.check_paths()
    assert cfg.models[0].configs_from == tmp_path / "base"


def test_yaml_file_loads_with_nested_defaults(tmp_path: Path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model_index.json").write_text("{}")
    f = tmp_path / "atelier.yaml"
    f.write_text(f"""
models:
  - id: stability-ai/sdxl
    path: {tmp_path / 'weights'}
    replicas: 2
    batching: {{max_batch_size: 8, wait_ms: 30}}
""")
    cfg = load_config(f)
    cfg.check_paths()
    m = cfg.models[0]
    assert (m.replicas, m.batching.max_batch_size, m.batching.wait_ms) == (2, 8, 30.0)
    assert m.limits.max_outputs == 4 and m.dtype == "float16"


def test_unreadable_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(f)


def test_lora_targets_default_per_family_and_can_be_set():
    flux = {"id": "acme/flux", "family": "flux", "embedded": "tiny-flux"}
    config = parse_config({"models": [flux, _model()],
                           "lora_folders": [{"path": "/x", "base": "flux"}]})
    flux_targets, sdxl_targets = (m.lora_targets for m in config.models)
    assert sdxl_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    # FLUX adapters train every linear layer of the blocks: both streams' attention,
    # feed-forwards, the single blocks' MLP and output, and the modulations.
    assert len(flux_targets) == 17 and {"add_q_proj", "proj_mlp", "norm1_context.linear",
                                        "ff_context.net.2"} <= set(flux_targets)
    chosen = parse_config({"models": [{**flux, "lora_targets": ["to_q", "to_v"]}]})
    assert chosen.models[0].lora_targets == ["to_q", "to_v"]
    with pytest.raises(ConfigError, match="models.0.lora_targets"):
        parse_config({"models": [{**flux, "lora_targets": []}]})


def test_a_webhook_secret_must_be_a_standard_webhooks_secret():
    base = default_config().model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"webhook_secret: .*whsec_"):
        parse_config({**base, "webhook_secret": "hunter2"})
    secret = "whsec_" + "QUJD" * 8  # base64 of 24 bytes
    assert parse_config({**base, "webhook_secret": secret}).webhook_secret == secret


def test_a_safety_checker_folder_must_hold_the_checker_and_its_image_processor(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    (tmp_path / "checker").mkdir()
    (tmp_path / "checker" / "config.json").write_text("{}")
    cfg = parse_config({"models": [{"id": "acme/real", "path": str(tmp_path / "base"),
                                    "safety_checker": {"path": str(tmp_path / "checker")}}]})
    with pytest.raises(ConfigError, match=r"models\.0\.safety_checker\.path: .*checker holds "
                                          r"no preprocessor_config\.json"):
        cfg.check_paths()
    (tmp_path / "checker" / "preprocessor_config.json").write_text("{}")
    cfg.check_paths()
    gone = parse_config({"models": [{"id": "acme/real", "path": str(tmp_path / "base"),
                                     "safety_checker": {"path": str(tmp_path / "no")}}]})
    with pytest.raises(ConfigError, match=r"models\.0\.safety_checker\.path: .*does not exist"):
        gone.check_paths()


def test_cors_origins_are_origins_as_browsers_send_them():
    origins = ["https://studio.example.com", "http://localhost:5173", "*"]
    assert parse_config({"models": [_model()],
                         "cors_allowed_origins": origins}).cors_allowed_origins == origins
    assert default_config().cors_allowed_origins == []
    for origin in ("https://studio.example.com/", "studio.example.com", "https://a.b/app"):
        with pytest.raises(ConfigError, match=rf"cors_allowed_origins: '{re.escape(origin)}' "
                           r"is not an origin: give scheme://host\[:port\], without a path"):
            parse_config({"models": [_model()], "cors_allowed_origins": [origin]})


def test_content_credentials_files_must_be_there(tmp_path):
    (tmp_path / "chain.pem").write_text("-----BEGIN CERTIFICATE-----")
    config = parse_config({"models": [_model()], "content_credentials": {
        "certificate": str(tmp_path / "chain.pem"), "private_key": str(tmp_path / "key.pem")}})
    assert config.content_credentials.algorithm == "es256"
    with pytest.raises(ConfigError, match=r"content_credentials\.private_key: .*key\.pem is "
                                          r"not a file"):
        config.check_paths()


def test_autoscaling_replaces_a_fixed_number_of_replicas():
    cfg = parse_config({"models": [_model(autoscaling={"max_replicas": 4},
                                          batching={"max_batch_size": 8},
                                          max_ongoing_requests=24)]})
    model = cfg.models[0]
    assert model.replica_range == (1, 4)
    # Unset, the target is one call running and one gathered behind it.
    assert model.autoscaling.ray_config(model.batching.max_batch_size) == {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
        "target_ongoing_requests": 16, "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    # As the replicas receive it (every field set), the config is still valid.
    assert type(model).model_validate(model.model_dump(mode="json")) == model
    assert parse_config({"models": [_model(replicas=3)]}).models[0].replica_range == (3, 3)


@pytest.mark.parametrize("autoscaling, extra, text", [
    ({"min_replicas": 3, "max_replicas": 2}, {}, "max_replicas must be at least min_replicas"),
    ({"max_replicas": 2}, {"replicas": 2}, "replicas: an autoscaled model's replicas"),
    ({"min_replicas": 0, "max_replicas": 2}, {}, "min_replicas"),
    ({"min_replicas": 1}, {}, "max_replicas"),
    # Replicas hold at most max_ongoing_requests (16 unset): a target there or over it is
    # never passed.
    ({"max_replicas": 2}, {"batching": {"max_batch_size": 8}},
     r"autoscaling.target_ongoing_requests \(16\) must be under max_ongoing_requests \(16\)"),
    ({"max_replicas": 2, "target_ongoing_requests": 6.5}, {"max_ongoing_requests": 6},
     r"target_ongoing_requests \(6.5\) must be under max_ongoing_requests \(6\)"),
])
def test_bad_autoscaling_is_refused_naming_the_field(autoscaling, extra, text):
    with pytest.raises(ConfigError, match=text):
        parse_config({"models": [_model(autoscaling=autoscaling, **extra)]})
