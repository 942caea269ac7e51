"""Where and how the model runs: device, precision, memory layout, compilation, determinism.

Every helper takes the config's value (``auto`` or an explicit choice) and returns what this
machine will really use, or raises a ValueError naming the key and the options. Training,
evaluation and prediction share them, so a checkpoint runs the same way under each.
"""

import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AMP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What cuBLAS needs for deterministic GEMMs (torch's error message asks for it); read when
# the first cuBLAS handle is created, so the entry point sets it before any CUDA work.
CUBLAS_DETERMINISTIC = ":4096:8"
# The CPU allocator reports exhaustion as a plain RuntimeError with this text.
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"

# With trainer.deterministic, ops that have no deterministic CUDA kernel (bilinear upsampling's
# and adaptive pooling's backward passes) warn instead of failing (warn_only): once each, not
# at every step.
warnings.filterwarnings("once", r".*does not have a deterministic implementation", UserWarning)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a Slurm or container CPU set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={device} but CUDA is not available; use auto or cpu")
    return resolved


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: Ampere and newer GPUs (not V100 or T4,
    where torch emulates it, slower than fp16), AVX-512 bf16 or AMX CPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # oneDNN runs bf16 convolutions and GEMMs about 2x faster than fp32 on AVX-512 CPUs.
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"


def resolve_precision(precision: str, device: torch.device, inference: bool = False) -> str:
    """``auto`` -> the fastest safe choice: bf16 where the hardware has it, else fp16 with a
    grad scaler on CUDA, else fp32.

    An explicit ``bf16`` the device only emulates is refused for training, naming the keys
    that work; for ``inference`` (a bf16 checkpoint evaluated on such a GPU) it runs in fp32
    with a warning that says how to choose.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; options: {list(PRECISIONS)}")
    bf16 = native_bf16(device)
    if precision == "auto":
        return "bf16" if bf16 else "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs CUDA; on the CPU use bf16 or fp32")
    if precision == "bf16" and not bf16:
        options = "trainer.precision=fp16 or fp32" if device.type == "cuda" else "fp32"
        if not inference:
            raise ValueError(
                f"trainer.precision=bf16: {device_name(device)} has no native bf16 (torch would "
                f"emulate it, slowly); use {options}"
            )
        log.warning(
            "trainer.precision=bf16 (the checkpoint's): %s has no native bf16, so this runs in "
            "fp32; add %s to choose", device_name(device), options,
        )  # fmt: skip
        return "fp32"
    return precision


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``auto`` -> channels_last everywhere: oneDNN (CPU) and cuDNN tensor cores both prefer it."""
    if channels_last == "auto":
        return True
    if not isinstance(channels_last, bool):
        raise ValueError(f"trainer.channels_last={channels_last!r}; options: auto, true, false")
    return channels_last


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """``auto`` -> torch.compile on CUDA, where it pays (U-Net-R34 on an H100: 282 against 159
    img/s after 48 s of compilation), not on the CPU, where it was 0.91-0.99x of eager. On CUDA
    ``auto`` also needs a C compiler (Triton builds its kernels with one): without, compile is
    off, said in one line before the first step."""
    if compile == "auto":
        if device.type != "cuda":
            return False
        if c_compiler() is None:
            log.warning(
                "trainer.compile=auto: no C compiler found (CC, cc, gcc, clang), which Triton "
                "needs to build kernels: training runs eagerly. Install gcc to compile."
            )
            return False
        return True
    if not isinstance(compile, bool):
        raise ValueError(f"trainer.compile={compile!r}; options: auto, true, false")
    return compile


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator's out-of-memory error: CUDA's (OutOfMemoryError) or the CPU's."""
    return isinstance(error, torch.OutOfMemoryError) or CPU_OUT_OF_MEMORY in str(error)


class CompiledForward(nn.Module):
    """``model`` with its forward compiled by torch.compile, which compiles at the first call.

    If that call fails (not for lack of memory: that is the step's own error), this call and
    every later one run ``model`` eagerly; ``failure`` keeps the error. Placed inside DDP
    (``DDP(CompiledForward(model))``), DDP's forward and its collectives run once per step on
    every rank, compiled or not, and torch compiles with its DDPOptimizer (the graph split at
    the gradient buckets, so that their all-reduces overlap the backward pass), as for
    ``torch.compile(DDP(model))``. The forward is compiled as a function, so the parameters
    are registered once, under ``model``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model.forward)
        self.calls = 0
        self.failure: Exception | None = None
        self.eager = False  # set when any rank's compile failed: all run eagerly

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.eager:
            return self.model(*args, **kwargs)
        if self.calls > 1:
            return self.compiled(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            self.failure, self.eager = error, True
            return self.model(*args, **kwargs)


@contextmanager
def compile_cache(directory: Path) -> Iterator[None]:
    """torch.compile's cache (inductor's and Triton's kernels) in ``directory`` while the block
    runs, unless ``TORCHINDUCTOR_CACHE_DIR`` is set: a requeued or restarted run then finds its
    kernels instead of compiling cold (inductor's default, /tmp/torchinductor_<user>, is often
    wiped between cluster jobs). Unset again after it: a sweep's next job, or a test's, sets
    its own."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory.absolute())
    try:
        yield
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def c_compiler() -> str | None:
    """The C compiler Triton would use (``$CC``, else cc, gcc or clang on the PATH), or None."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for name in candidates if (path := shutil.which(name))), None)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Set torch's process-wide flags for this run, both ways: a sweep's jobs and a test
    session share one process, and a flag one run switched on must not leak into the next.

    Deterministic: every op that has a deterministic kernel uses it (cuDNN convolutions,
    scatter/index ops); ops without one warn once (``warn_only``) and stay nondeterministic
    on CUDA. Otherwise cuDNN autotunes its kernels for the fixed crop size.
    """
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if deterministic and device.type == "cuda" and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        log.warning(
            "trainer.deterministic=true but CUBLAS_WORKSPACE_CONFIG is not set: cuBLAS GEMMs may "
            "differ between runs. train.py sets it; set CUBLAS_WORKSPACE_CONFIG=%s yourself "
            "when building a Trainer in your own script", CUBLAS_DETERMINISTIC,
        )  # fmt: skip
