#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (the `device` tool) or any CUDA box:
# versions first, then every gpu-marked test (tests/e2e/test_cuda.py: each precision trained
# and resumed, compile, deterministic resume, a checkpoint from more GPUs, DDP over NCCL),
# about 5 minutes on one H100/H200. Output also goes to $OUT/gpu_check.log when $OUT is set.
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
  OMP_NUM_THREADS=4 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/e2e/test_cuda.py
} 2>&1 | tee "$log"
