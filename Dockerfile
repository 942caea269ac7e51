# CUDA image with PyTorch; seg and its other dependencies are installed on top. The -devel
# image, not -runtime: Triton compiles torch.compile's kernels with a C compiler, which the
# runtime image lacks (trainer.compile=auto would then run eagerly, with one log line).
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

WORKDIR /workspace/seg
COPY pyproject.toml README.md ./
COPY seg ./seg
COPY configs ./configs
COPY train.py evaluate.py predict.py ./
COPY scripts ./scripts
# The image's torch/torchvision satisfy the version ranges, so pip keeps them; [export] adds
# onnx/onnxruntime for scripts/export.py.
RUN pip install --no-cache-dir ".[export]" && \
    useradd --create-home seg && chown -R seg /workspace
USER seg

# Mount datasets under /workspace/seg/data and collect runs from /workspace/seg/outputs:
#   docker run --gpus all --shm-size 8g -v $PWD/data:/workspace/seg/data \
#     -v $PWD/outputs:/workspace/seg/outputs seg experiment=cityscapes_unet
# Other commands: --entrypoint seg-evaluate (seg-predict, seg-export, seg-doctor).
ENTRYPOINT ["seg-train"]
