"""The config of the integration tests' session app (see conftest's docstring for what each
model shows): its API keys, its SDXL models, its FLUX models and its adapter catalog."""

from tests.integration.conftest import (
    API_KEY,
    AUTOSCALED,
    BATCHED,
    CANNY,
    CHECKED,
    DEADLINE,
    DEPTH,
    ESRGAN_VERSION,
    FAST,
    FILL,
    FLUX,
    IMAGES_KEY,
    INPAINTING,
    KONTEXT,
    LIMITED_KEY,
    MAX_BODY_BYTES,
    MODELS_KEY,
    ONE_SLOT,
    OPS_KEY,
    QUEUE_KEY,
    REDUX,
    RESTARTABLE,
    SDXL_VERSION,
    SMALL_MEMORY,
    STALL,
    STUDIO,
    TWO_REPLICAS,
    URGENT_KEY,
    URGENT_SECRET,
    _model,
)


def session_config(cache_dir, bad_adapters, made_adapters, named_adapters, safety_checker,
                   signing_files, two_ip_adapters) -> dict:
    """The `atelier` section of the session app's config, from the session fixtures'
    files."""
    return {"cache_dir": str(cache_dir), "api_keys": _api_keys(),
            "webhook_allowed_hosts": ["127.0.0.1"], "image_allowed_hosts": ["127.0.0.1"],
            "lora_allowed_hosts": ["127.0.0.1"],
            "max_body_bytes": MAX_BODY_BYTES, "cors_allowed_origins": [STUDIO],
            "content_credentials": {"certificate": str(signing_files[0]),
                                    "private_key": str(signing_files[1])},
            "models": [*_sdxl_models(safety_checker, two_ip_adapters), *_flux_models()],
            "lora_folders": _lora_folders(bad_adapters, made_adapters, named_adapters)}


def _api_keys() -> list:
    return [API_KEY, {"key": LIMITED_KEY, "name": "team-a", "requests_per_minute": 3},
            {"key": IMAGES_KEY, "name": "team-b", "images_per_minute": 6},
            {"key": MODELS_KEY, "name": "team-c", "priority": 5,
             "models": ["black-forest-labs/flux-dev", BATCHED]},
            {"key": OPS_KEY, "name": "ops", "sees_all_predictions": True},
            {"key": URGENT_KEY, "name": "team-d", "priority": 9,
             "webhook_secret": URGENT_SECRET},
            {"key": QUEUE_KEY, "name": "team-e", "max_unfinished_predictions": 2}]


def _sdxl_models(safety_checker, two_ip_adapters) -> list:
    return [
        _model(FAST, 10, aliases=["stability-ai/sdxl", "dall-e-3"], max_loaded_adapters=2,
               styles={"cinematic": {"prompt": "cinematic still of {prompt}, film grain",
                                     "negative_prompt": "cartoon"}},
               refiner={"embedded": "tiny-sdxl-refiner"},
               controlnets={"canny": {"embedded": "tiny-sdxl-controlnet", "preprocess": "canny"},
                            "lines": {"embedded": "tiny-sdxl-controlnet",
                                      "conditioning_scale": 0.5}},
               ip_adapter={"embedded": "tiny-sdxl-ip-adapter", "scale": 0.8},
               upscalers={"esrgan": {"embedded": "tiny-esrgan"}},
               upscaling_aliases=["nightmareai/real-esrgan"],
               replicate_versions=[f"stability-ai/sdxl:{SDXL_VERSION}",
                                   f"nightmareai/real-esrgan:{ESRGAN_VERSION}"],
               limits={"max_size": 512, "max_pixels": 256 * 256, "max_steps": 60,
                       "max_loras": 2}),
        # The tiny IP-Adapter's files and a further "plus" adapter, `face`.
        _model(BATCHED, 2000, ip_adapter={"path": str(two_ip_adapters), "extra": {
            "face": {"weight_name": "ip-adapter-plus_sdxl.safetensors", "scale": 0.7}}},
               prompts={"chunks": 3}),
        _model(ONE_SLOT, 1500, max_ongoing_requests=1, max_queued_requests=1,
               batching={"max_batch_size": 1, "wait_ms": 1500}),
        _model(TWO_REPLICAS, 10, replicas=2, label_images=False,
               prompts={"chunks": 2, "weights": True}),
        _model(RESTARTABLE, 1000),
        _model(DEADLINE, 10, request_timeout_s=1.5,
               limits={"max_size": 512, "max_pixels": 256 * 256, "max_steps": 60}),
        _model(SMALL_MEMORY, 1000, simulate_oom_above_images=2, health_check_period_s=1,
               limits={"max_size": 512, "max_pixels": 256 * 256, "max_steps": 20,
                       "max_request_pixels": 3 * 64 * 64}),
        _model(STALL, 10, health_stall_s=1.5, health_check_period_s=1,
               limits={"max_size": 512, "max_pixels": 256 * 256, "max_steps": 60}),
        _model(CHECKED, 10, safety_checker={"path": str(safety_checker)}),
        _model(INPAINTING, 10, embedded="tiny-sdxl-inpainting", inpainting=True,
               aliases=["diffusers/stable-diffusion-xl-1.0-inpainting-0.1"]),
        _model(AUTOSCALED, 10, autoscaling={"max_replicas": 2, "target_ongoing_requests": 1,
                                            "upscale_delay_s": 0, "downscale_delay_s": 2})]


def _flux_models() -> list:
    return [
        # FLUX's adapters are merged into its weights (SDXL's, above, run in LoRA slots),
        # whose attention projections are fused and whose transformer blocks run in FP8;
        # its image prompts go through XLabs' IP-Adapter (the other FLUX models' through
        # Redux).
        _model(FLUX, 10, family="flux", embedded="tiny-flux", keep_warm_s=3,
               fuse_adapters=True, speed={"fuse_qkv": True, "fp8": True},
               controlnets={name: {"embedded": "tiny-flux-controlnet", **net} for name, net in {
                   "canny": {"control_mode": 0, "preprocess": "canny"},
                   "edges": {"control_mode": 0},
                   "depth": {"control_mode": 2, "preprocess": "depth", "conditioning_scale": 0.8},
                   "depth-map": {"control_mode": 2, "conditioning_scale": 0.8}}.items()},
               depth_estimator={"embedded": "tiny-depth-anything"},
               ip_adapter={"embedded": "tiny-flux-ip-adapter"},
               aliases=["black-forest-labs/flux-dev"],
               defaults={"width": 64, "height": 64, "num_inference_steps": 4,
                         "guidance_scale": 3}),
        _model(KONTEXT, 10, family="flux", embedded="tiny-flux-kontext", kontext=True,
               redux={"embedded": "tiny-flux-redux"},
               aliases=["black-forest-labs/flux-kontext-dev", "gpt-image-1"],
               defaults={"width": 96, "height": 96, "num_inference_steps": 4,
                         "guidance_scale": 2.5}),
        _model(FILL, 10, family="flux", embedded="tiny-flux-fill", fill=True,
               redux={"embedded": "tiny-flux-redux"}, aliases=["black-forest-labs/flux-fill-dev"],
               defaults={"width": 96, "height": 96, "num_inference_steps": 4,
                         "guidance_scale": 30}),
        _model(CANNY, 10, family="flux", embedded="tiny-flux-canny", canny=True,
               aliases=["black-forest-labs/flux-canny-dev"],
               defaults={"width": 96, "height": 96, "num_inference_steps": 4,
                         "guidance_scale": 30}),
        _model(DEPTH, 10, family="flux", embedded="tiny-flux-depth", depth=True,
               depth_estimator={"embedded": "tiny-depth-anything"},
               redux={"embedded": "tiny-flux-redux"},
               aliases=["black-forest-labs/flux-depth-dev"],
               defaults={"width": 96, "height": 96, "num_inference_steps": 4,
                         "guidance_scale": 10}),
        _model(REDUX, 500, family="flux", embedded="tiny-flux",
               redux={"embedded": "tiny-flux-redux"},
               aliases=["black-forest-labs/flux-redux-dev"],
               defaults={"width": 64, "height": 64, "num_inference_steps": 4,
                         "guidance_scale": 3})]


def _lora_folders(bad_adapters, made_adapters, named_adapters) -> list:
    return [{"embedded": "tiny-sdxl-demo", "base": "sdxl"},
            {"embedded": "tiny-flux-demo", "base": "flux"},
            {"path": str(bad_adapters[0]), "base": "sdxl"},
            {"path": str(bad_adapters[1]), "base": "acme/other"},
            {"path": str(made_adapters), "base": "sdxl"},
            {"path": str(named_adapters), "base": "flux"}]
