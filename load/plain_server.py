"""The baseline Atelier is measured against: a plain FastAPI + diffusers `/generate` server.

It is what teams write first: one diffusers pipeline of the folder's own class
(`StableDiffusionXLPipeline` in fp16, or `FluxPipeline` in bf16 as FLUX's model card runs
it) with diffusers' default attention (PyTorch SDPA), one request at a time under a lock,
images returned as base64 PNG in JSON (the same shape as Atelier's `/generate`, so one
client drives both).

    python -m load.plain_server --model /path/to/sdxl-folder --port 8090
    python -m load.plain_server --model /path/to/flux-folder --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io

import torch
import uvicorn
from diffusers import DiffusionPipeline
from fastapi import FastAPI
from pydantic import BaseModel


class GenerateBody(BaseModel):
    prompt: str
    negative_prompt: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int | None = None
    num_outputs: int = 1


def create_app(model: str, dtype: str = "float16") -> FastAPI:
    cuda = torch.cuda.is_available()
    pipe = DiffusionPipeline.from_pretrained(
        model, dtype=getattr(torch, dtype) if cuda else torch.float32,
        local_files_only=True, use_safetensors=True).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    lock = asyncio.Lock()
    app = FastAPI(title="plain diffusers server")

    def run(body: GenerateBody) -> list[str]:
        generator = None if body.seed is None else torch.Generator("cpu").manual_seed(body.seed)
        images = pipe(prompt=body.prompt, negative_prompt=body.negative_prompt,
                      width=body.width, height=body.height, num_inference_steps=body.steps,
                      guidance_scale=body.guidance_scale, generator=generator,
                      num_images_per_prompt=body.num_outputs).images
        encoded = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        return encoded

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(body: GenerateBody) -> dict:
        async with lock:  # one pipeline call at a time, as the plain example does
            images = await asyncio.to_thread(run, body)
        return {"images": images}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers SDXL or FLUX folder")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args = p.parse_args()
    uvicorn.run(create_app(args.model, args.dtype), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
