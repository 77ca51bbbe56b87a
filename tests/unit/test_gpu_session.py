"""load/gpu_session.sh, whose steps run only on a lent GPU machine: each step's commands
are recorded here by a stand-in `python3` and parsed by the programs they call, so a
misspelt option or variant shows here, not after minutes of device time."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = {  # step arguments: the programs each runs
    ("engine",): ["load.bench_engine"],
    ("engine-fp8",): ["load.bench_engine"],
    ("engine-static",): ["load.bench_engine"],
    ("engine-calibrated",): ["load.bench_engine"],
    ("fp8-error",): ["load.fp8_error"],
    ("engine-512",): ["load.bench_engine"],
    ("engine-autotune",): ["load.bench_engine"],
    ("throughput", "compiled-fp8"): ["load.bench_throughput"],
    ("keep-warm",): ["load.bench_throughput"],
    ("adapters",): ["load.bench_adapters"] * 2,
    ("adapters", "slots-compiled-fp8"): ["load.bench_adapters"],
    ("engine-flux", "compiled-fp8"): ["load.bench_engine"],
    ("controlnet",): ["load.bench_controlnet"],
    ("image-prompts",): ["load.bench_image_prompts"],
    ("kontext",): ["load.bench_kontext"],
    ("fill",): ["load.bench_fill"],
    ("redux",): ["load.bench_redux"],
    ("controlnet-flux",): ["load.bench_controlnet"],
    ("sdxl-options",): ["load.bench_sdxl_options"],
    ("flux-options",): ["load.bench_sdxl_options"],
    ("tests",): ["pytest"],
    ("serving-mix",): ["load.bench_serving"] * 2,
    ("serving-mix", "prompts"): ["load.bench_serving"] * 2,
}


def _run(tmp_path: Path, *step: str, gpu: str | None = "NVIDIA H200"
         ) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a step with the stand-in `python3` and an `nvidia-smi` that names `gpu` (None:
    fails); return the run and the file of its calls."""
    shims, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    shims.mkdir(exist_ok=True)
    python3 = shims / "python3"
    python3.write_text('#!/bin/sh\nexec "$ATELIER_REAL_PYTHON" -c \'import json, os, sys\n'
                       'open(os.environ["ATELIER_CALLS"], "a").write(json.dumps(sys.argv[1:])'
                       ' + "\\n")\' "$@"\n')
    (shims / "nvidia-smi").write_text(  # with no GPU it fails, printing nothing
        '#!/bin/sh\nexit 9\n' if gpu is None else
        f'#!/bin/sh\n[ "$*" = "--query-gpu=name --format=csv,noheader" ] && echo "{gpu}"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "ATELIER_CALLS": str(log), "ATELIER_REAL_PYTHON": sys.executable}
    done = subprocess.run(["bash", "load/gpu_session.sh", *step], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return done, log


def _record(tmp_path: Path, *step: str, **gpu: str | None) -> list[list[str]]:
    done, log = _run(tmp_path, *step, **gpu)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("step", list(STEPS), ids=" ".join)
def test_each_gpu_step_calls_its_programs_with_options_they_accept(tmp_path, step):
    install, *calls = _record(tmp_path, *step)
    assert install[:3] == ["-m", "pip", "install"] and "--no-index" in install
    assert [c[1] for c in calls] == STEPS[step]
    for call in calls:
        if call[1] == "pytest":
            continue
        args = importlib.import_module(call[1])._parse_args(call[2:])
        assert args.out.startswith(str(tmp_path / "out")) and args.out.endswith(".json")
        assert "-h200" in Path(args.out).name and "h100" not in args.out
        assert args.size == (512 if step == ("engine-512",) else 1024)


def test_the_throughput_step_serves_as_the_fast_config_does(tmp_path):
    (_, (_, _, *argv)) = _record(tmp_path, "throughput")
    from load.bench_models import VARIANTS
    from load.bench_throughput import _parse_args
    from serve.config import SpeedConfig, load_config

    args = _parse_args(argv)
    fast = load_config(ROOT / "serve/configs/sdxl-gpu-fast.yaml").models[0]
    assert (args.batch, args.wait_ms) == (fast.batching.max_batch_size, fast.batching.wait_ms)
    dtype, speed = VARIANTS[args.variant]
    assert (dtype, SpeedConfig(**speed)) == (fast.dtype, fast.speed)
    assert (args.steps, args.guidance, args.idle_s) == (20, 8, 30)
    assert min(args.concurrency) >= 2 * args.batch  # a batch waits while one runs


def test_an_unknown_step_or_mode_is_refused(tmp_path):
    for step, said in ((["warp-speed"], "unknown step warp-speed"),
                       (["adapters", "turbo"], "unknown adapters mode turbo"),
                       (["serving-mix", "sizes"], "unknown serving-mix sizes")):
        done, log = _run(tmp_path, *step)
        assert done.returncode == 2 and said in done.stdout + done.stderr
        assert len(log.read_text().splitlines()) == 1  # the install, and nothing measured


@pytest.mark.parametrize(("gpu", "tag"), [("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
                                          ("NVIDIA RTX PRO 6000 Blackwell Server Edition",
                                           "rtx-pro-6000-blackwell-server-edition"),
                                          (None, "gpu")])
def test_figures_are_named_after_the_gpu_they_were_measured_on(tmp_path, gpu, tag):
    (_, (_, _, *argv)) = _record(tmp_path, "engine-512", gpu=gpu)
    from load.bench_engine import _parse_args

    assert Path(_parse_args(argv).out).name == f"engine-{tag}-512.json"


def test_the_serving_mix_step_serves_uniform_then_mixed_clients(tmp_path):
    from load.bench_serving import _parse_args

    for mix in ("guidance", "prompts"):
        (_, *calls) = _record(tmp_path, "serving-mix", mix)
        uniform, mixed = (_parse_args(call[2:]) for call in calls)
        assert [Path(a.out).name for a in (uniform, mixed)] == [
            f"serving-h200-{mix}-uniform.json", f"serving-h200-{mix}-mixed.json"]
        assert uniform.batch == mixed.batch == 8 and uniform.concurrency == [16]
        if mix == "guidance":
            assert (uniform.guidance_mix, mixed.guidance_mix) == (None, [5, 7.5, 9, 11])
        else:
            assert uniform.prompt_chunks == mixed.prompt_chunks == 3
            assert (uniform.prompt_words, mixed.prompt_words) == (None, [0, 100, 200])
