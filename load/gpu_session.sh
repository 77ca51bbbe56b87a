#!/usr/bin/env bash
# The GPU measurements of the speed work, one step per device call, each well inside the
# 10 minutes a call may take. Device time is short (a lent machine may leave room for one
# step after its start, or two: engine-static and throughput fitted into 15 minutes on an
# H200), so run the steps not yet measured in this order: engine-calibrated (FP8 with
# calibrated activation scales beside the dynamic ones, static shapes), throughput with
# the fastest variant (after engine-calibrated: throughput compiled-fp8cal-b8, whose
# compiled code that step leaves in the cache while the machine stays warm; the buckets
# variants compile three more shapes at start-up), engine-cudnnbench, fp8-error, keep-warm, engine-512,
# engine-autotune, engine-lightning, adapters, engine-flux, controlnet, image-prompts,
# image-prompts-flux, kontext, fill, redux, controlnet-flux, serving-mix (guidance, prompts).
# Here, once, in the project root:
#   echo /.whl/ >> .git/info/exclude
#   ../shared/gpu/make-wheels.sh .whl pytest pluggy iniconfig pytest-timeout
#   cp ../shared/gpu/sdxl-base-configs.json .whl/
# then on the device, carrying .whl:   bash load/gpu_session.sh STEP
#   engine      compiled bf16, cuDNN attention and the guidance cutoff, with the kernel profile
#   engine-fp8  the FP8 variants (row-wise with fast accumulation, per tensor, then row-wise
#               without, measured before and the first to drop if time runs out), with the
#               kernel profile
#   engine-static  compiled for static shapes (calls padded to 8 images), bf16 and FP8
#   engine-calibrated  FP8 with activation scales calibrated at start-up against scales
#               made at each call, both for static shapes, with the kernel profile
#   engine-cudnnbench  calibrated FP8 for static shapes with cuDNN timing its convolution
#               algorithms (speed.cudnn_benchmark), with the kernel profile
#   fp8-error   each FP8 layer's error against float32 beside bfloat16's, in one real call
#   engine-512  512², 30 steps (the 6 img/s target): compiled, FP8, FP8 with the cutoff
#   engine-autotune  compiled with Inductor's kernel autotuning (a longer first start)
#   engine-lightning  SDXL as few-step models run it (4 steps, guidance 0: one UNet row
#               per image), 1024², compiled FP8 in calls of 8
#   tests       tests/gpu (CUDA paths: FLUX, adapters, memory, partial images)
#   throughput  through HTTP against the plain server, with an idle spell (cold start)
#   keep-warm   the same idle spell with keep_warm_s 2, Atelier alone
#   adapters    LoRA switching and requests with different adapters in one call, at rank
#               64: in slots and merged, or the modes named after it (slots, fuse,
#               slots-compiled-fp8, fuse-compiled-fp8; the compiled ones one per call)
#   controlnet  what none, one and two ControlNets (controlnet-canny-sdxl-1.0's design,
#               random weights) cost per call, eager bf16, batches of 1 and 8
#   image-prompts what an IP-Adapter (ip-adapter_sdxl_vit-h's design, random weights) costs
#               per call with none, half and all images prompted, eager bf16, batches 1, 8,
#               and a second (plus) adapter beside it, both prompted
#   image-prompts-flux  the same for XLabs' FLUX IP-Adapter's design (CLIP ViT-L/14) on
#               FLUX.1-dev's architecture, random weights, 1024², 28 steps, batches 1, 2
#   kontext     what a FLUX.1 Kontext edit costs against text-to-image (FLUX.1-dev's
#               architecture, random weights, served as Kontext), 1024², 28 steps, eager
#               bf16, batches of 1 and 2
#   fill        what a FLUX.1 Fill fill costs against FLUX.1's own inpainting (random
#               weights, FLUX.1-dev's architecture; the Fill transformer built beside it),
#               1024², 28 steps, eager bf16, batches of 1 and 2
#   redux       what a FLUX.1 Redux image prompt costs against text-to-image (random
#               weights, FLUX.1-dev's and FLUX.1-Redux-dev's architectures; 729 more text
#               tokens), 1024², 28 steps, eager bf16, batches of 1 and 2, and one encoding
#   controlnet-flux  what none, one and two FLUX ControlNets (InstantX's Union design, random
#               weights; two modes of one union) cost per call, 1024², 28 steps, eager bf16,
#               batches of 1 and 2
#   serving-mix through HTTP (eager float16, calls of up to 8), clients of one guidance
#               scale and then of four, or (serving-mix prompts) prompts of one chunk and
#               then of one, two and three: what mixed traffic's shared calls serve
#   engine-flux FLUX.1-dev's architecture (random weights, built on the GPU by the first
#               call), 1024², 28 steps, batch 4: compiled bf16, or the variants named after
#               it (one per call fits: engine-flux compiled, then engine-flux compiled-fp8)
# throughput and keep-warm serve the `compiled-fp8-buckets` variant (the settings of
# serve/configs/sdxl-gpu-fast.yaml), or the one named after the step (the fastest the
# engine steps found: bash load/gpu_session.sh throughput compiled-fp8cal-b8);
# engine-autotune runs compiled-autotune, or the variant named after it.
# Figures go to $OUT (results/ when unset) as JSON, with each step's console output; the
# files are named after the GPU the step ran on (its name as nvidia-smi gives it, without
# "NVIDIA", lower-cased: h100-80gb-hbm3, h200, ...), so two cards' figures never mix.
set -euo pipefail
step=${1:?"step: engine | engine-fp8 | engine-static | engine-calibrated | engine-cudnnbench | fp8-error | engine-512 | engine-autotune | engine-lightning | tests | throughput | keep-warm | adapters | engine-flux | controlnet | image-prompts | image-prompts-flux | kontext | fill | redux | controlnet-flux | sdxl-options | flux-options | serving-mix"}
variant=${2:-compiled-fp8-buckets}
out=${OUT:-results}
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
gpu=$(echo "${gpu#NVIDIA }" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
gpu=${gpu:-gpu}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export ATELIER_CACHE_DIR=/tmp/atelier  # the model and compile caches, kept while warm
sdxl=(--random-sdxl .whl/sdxl-base-configs.json --size 1024 --steps 20)
# Serving as sdxl-gpu-fast.yaml does (batches of 8, 100 ms window), at the client counts
# that made the most images/s in the last run. Estimated from that run's parts at about 9
# minutes with the compile cache of an earlier step; the report is saved after each part
# in case the call runs out.
served=(--batch 8 --wait-ms 100 --single 4 --idle-s 30)
log="$out/gpu-$step.txt"
case $step in
  engine) python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --profile \
            --variants compiled compiled-cudnn compiled-cfg50 \
            --out "$out/engine-$gpu-compiled.json" 2>&1 | tee "$log" ;;
  engine-fp8) python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --profile \
                --variants compiled-fp8 compiled-fp8-tensor compiled-fp8-slowaccum \
                --out "$out/engine-$gpu-fp8.json" 2>&1 | tee "$log" ;;
  engine-static) python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --profile \
                   --variants compiled-b8 compiled-fp8-b8 \
                   --out "$out/engine-$gpu-static.json" 2>&1 | tee "$log" ;;
  engine-calibrated) python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --profile \
                       --variants compiled-fp8-b8 compiled-fp8cal-b8 \
                       --out "$out/engine-$gpu-fp8cal.json" 2>&1 | tee "$log" ;;
  engine-cudnnbench) python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --profile \
                       --variants compiled-fp8cal-b8-cudnnbench \
                       --out "$out/engine-$gpu-cudnnbench.json" 2>&1 | tee "$log" ;;
  fp8-error) python3 -m load.fp8_error "${sdxl[@]}" --out "$out/fp8-error-$gpu.json" \
               2>&1 | tee "$log" ;;
  engine-512) python3 -m load.bench_engine --random-sdxl .whl/sdxl-base-configs.json \
                --size 512 --steps 30 --batches 16 \
                --variants compiled compiled-fp8 compiled-fp8-cfg50 \
                --out "$out/engine-$gpu-512.json" 2>&1 | tee "$log" ;;
  engine-lightning) python3 -m load.bench_engine --random-sdxl .whl/sdxl-base-configs.json \
                     --size 1024 --steps 4 --guidance 0 --batches 8 --repeats 3 \
                     --variants compiled-fp8-b8 \
                     --out "$out/engine-$gpu-lightning.json" 2>&1 | tee "$log" ;;
  engine-autotune) tuned=${2:-compiled-autotune}
                   python3 -m load.bench_engine "${sdxl[@]}" --batches 8 --variants "$tuned" \
                     --out "$out/engine-$gpu-$tuned.json" 2>&1 | tee "$log" ;;
  tests) python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$log" ;;
  throughput) python3 -m load.bench_throughput "${sdxl[@]}" "${served[@]}" --variant "$variant" \
                --concurrency 16 24 --duration 30 --open-s 40 \
                --out "$out/throughput-$gpu-$variant-idle.json" 2>&1 | tee "$log" ;;
  keep-warm) python3 -m load.bench_throughput "${sdxl[@]}" "${served[@]}" --variant "$variant" \
               --keep-warm-s 2 --no-baseline --no-restart --concurrency 16 --duration 20 \
               --open-s 20 --out "$out/throughput-$gpu-$variant-keepwarm.json" 2>&1 | tee "$log" ;;
  adapters) shift; modes=("$@"); [ ${#modes[@]} -gt 0 ] || modes=(slots fuse)
            for mode in "${modes[@]}"; do
              case $mode in
                slots) flag=() ;;
                fuse) flag=(--fuse) ;;
                slots-compiled-fp8) flag=(--variant compiled-fp8) ;;
                fuse-compiled-fp8) flag=(--fuse --variant compiled-fp8) ;;
                *) echo "unknown adapters mode $mode" >&2; exit 2 ;;
              esac
              python3 -m load.bench_adapters "${sdxl[@]}" --rank 64 --requests 10 \
                "${flag[@]}" --out "$out/adapters-$gpu-r64-$mode.json"
            done 2>&1 | tee "$log" ;;
  serving-mix) mix=${2:-guidance}
               case $mix in
                 guidance) runs=("uniform --guidance 7.5" "mixed --guidance-mix 5 7.5 9 11") ;;
                 prompts) runs=("uniform --prompt-chunks 3"
                                "mixed --prompt-chunks 3 --prompt-words 0 100 200") ;;
                 *) echo "unknown serving-mix $mix" >&2; exit 2 ;;
               esac
               for run in "${runs[@]}"; do
                 read -r -a flag <<< "$run"
                 python3 -m load.bench_serving "${sdxl[@]}" --batch 8 --wait-ms 100 --single 2 \
                   --concurrency 16 --duration 45 "${flag[@]:1}" \
                   --out "$out/serving-$gpu-$mix-${flag[0]}.json"
               done 2>&1 | tee "$log" ;;
  engine-flux) shift; flux=("$@"); [ ${#flux[@]} -gt 0 ] || flux=(compiled)
               python3 -m load.bench_engine --random-flux load/flux-dev-configs.json \
                 --size 1024 --steps 28 --batches 4 --repeats 1 --variants "${flux[@]}" \
                 --out "$out/engine-$gpu-flux1024-$(IFS=_; echo "${flux[*]}").json" \
                 2>&1 | tee "$log" ;;
  sdxl-options) python3 -m load.bench_sdxl_options "${sdxl[@]}" --batches 1 8 --repeats 2 \
                 --out "$out/sdxl-options-$gpu.json" 2>&1 | tee "$log" ;;
  flux-options) python3 -m load.bench_sdxl_options --random-flux load/flux-dev-configs.json \
                  --size 1024 --steps 28 --batches 1 4 --repeats 1 \
                  --out "$out/flux-options-$gpu.json" 2>&1 | tee "$log" ;;
  controlnet) python3 -m load.bench_controlnet "${sdxl[@]}" --batches 1 8 --repeats 2 \
               --out "$out/controlnet-$gpu.json" 2>&1 | tee "$log" ;;
  image-prompts) python3 -m load.bench_image_prompts "${sdxl[@]}" --batches 1 8 --repeats 2 \
                   --two-adapters --boards --masks --out "$out/image-prompts-$gpu.json" \
                   2>&1 | tee "$log" ;;
  image-prompts-flux) python3 -m load.bench_image_prompts \
                        --random-flux load/flux-dev-configs.json --size 1024 --steps 28 \
                        --batches 1 2 --repeats 1 --out "$out/flux-image-prompts-$gpu.json" \
                        2>&1 | tee "$log" ;;
  kontext) python3 -m load.bench_kontext --random-flux load/flux-dev-configs.json \
             --size 1024 --steps 28 --batches 1 2 --repeats 1 \
             --out "$out/kontext-$gpu.json" 2>&1 | tee "$log" ;;
  fill) python3 -m load.bench_fill --random-flux load/flux-dev-configs.json \
          --size 1024 --steps 28 --batches 1 2 --repeats 1 \
          --out "$out/fill-$gpu.json" 2>&1 | tee "$log" ;;
  redux) python3 -m load.bench_redux --random-flux load/flux-dev-configs.json \
           --size 1024 --steps 28 --batches 1 2 --repeats 1 \
           --out "$out/redux-$gpu.json" 2>&1 | tee "$log" ;;
  controlnet-flux) python3 -m load.bench_controlnet --random-flux load/flux-dev-configs.json \
                     --size 1024 --steps 28 --batches 1 2 --repeats 1 \
                     --out "$out/controlnet-flux-$gpu.json" 2>&1 | tee "$log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
