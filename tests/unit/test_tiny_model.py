import hashlib

from deployments.tiny import TINY_SDXL, ensure_embedded


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_embedded_model_is_a_diffusers_folder_of_safetensors(tiny_sdxl_path):
    files = _digest(tiny_sdxl_path)
    assert "model_index.json" in files
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model",
                 "text_encoder/model", "text_encoder_2/model"):
        assert f"{part}.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt"))]
    assert "tokenizer/tokenizer.json" in files and "tokenizer_2/tokenizer.json" in files


def test_embedded_model_is_built_identically_every_time(tmp_path, tiny_sdxl_path):
    again = ensure_embedded(TINY_SDXL, tmp_path)
    assert again != tiny_sdxl_path
    assert _digest(again) == _digest(tiny_sdxl_path)


def test_a_built_model_is_reused_not_rebuilt(tiny_sdxl_path):
    unet = tiny_sdxl_path / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    assert ensure_embedded(TINY_SDXL, tiny_sdxl_path.parent) == tiny_sdxl_path
    assert unet.stat().st_mtime_ns == before
