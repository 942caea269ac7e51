#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (the `device` tool) or any CUDA box:
# versions first, then every gpu-marked test (tests/e2e/test_cuda.py: each precision trained
# and resumed, compile, deterministic resume, a checkpoint from more GPUs, DDP over NCCL),
# about 5 minutes on one H100/H200. Output also goes to $OUT/gpu_check.log when $OUT is set.
# `bash scripts/gpu_check.sh bench` runs the speed figures instead (issue 25; several minutes,
# compile included): the Trainer step against the plain loop, eager and compiled, for U-Net-R34
# and DeepLabV3+ at 512x1024, the share of the bf16 ceiling, end to end, and a profiler trace
# of 10 steps as fit runs them ($OUT/traces/<model>.json, the GPU's busy share and longest gap),
# all in $OUT/bench.json.
#
# The device machine has torch but not seg's other dependencies and no network: from the
# repository root, fetch them as wheels once (git-ignored through .git/info/exclude) with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 \
#     simsimd==6.5.16 stringzilla==5.3.2 hydra-core==1.3.8 omegaconf==2.3.1 \
#     antlr4-python3-runtime==4.9.3 pydantic pydantic-core annotated-types typing-inspection
# and pass carry=[".whl"] with the command `bash scripts/gpu_check.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-/tmp}/gpu_check.log"
{
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'EOF'
import torch, torchvision
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version(), "torchvision", torchvision.__version__)
print("device", torch.cuda.get_device_name(0), "bf16 native",
      torch.cuda.is_bf16_supported(including_emulation=False))
EOF
  if [ "${1:-}" = bench ]; then
    out="${OUT:-/tmp}"
    python3 scripts/benchmark.py --device cuda --models unet deeplabv3plus --size 512 1024 \
      --batch 8 --skip-data --trace "$out/traces" --json "$out/bench.json"
  else
    OMP_NUM_THREADS=4 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/e2e/test_cuda.py
  fi
} 2>&1 | tee "$log"
