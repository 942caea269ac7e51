"""trainer.deterministic: flags set both ways, a cross-entropy with deterministic CUDA kernels,
and which models avoid every op that has none (recorded on the CPU, where the same aten ops
run as on CUDA)."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from seg.losses import CrossEntropy
from tests.conftest import compose_config, group_options, semantic_models
from tests.unit.test_trainer import make_trainer

aten = torch.ops.aten
# The differentiable ops of torch.use_deterministic_algorithms' list "will throw a RuntimeError"
# that segmentation models use, by their aten names (torch 2.14's docstring).
NONDETERMINISTIC_ON_CUDA = {
    aten.upsample_linear1d_backward.default,
    aten.upsample_bilinear2d_backward.default,
    aten.upsample_bicubic2d_backward.default,
    aten.upsample_trilinear3d_backward.default,
    aten._adaptive_avg_pool2d_backward.default,
    aten.adaptive_max_pool2d_backward.default,
    aten.avg_pool3d_backward.default,
    aten.reflection_pad1d_backward.default,
    aten.reflection_pad2d_backward.default,
    aten.max_unpool2d.default,
}
REDUCED_NLL = (aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
# The model options whose training step runs on deterministic CUDA kernels alone: resumed with
# trainer.deterministic=true on a GPU they continue bit for bit (docs: resume and reliability).
EXACT_ON_CUDA = {"linknet", "manet", "unet", "unetplusplus", "tiny/semantic"}


class NondeterministicOps(TorchDispatchMode):
    """Records the ops of a forward and backward pass that have no deterministic CUDA kernel
    (and the mean/sum-reduced NLL losses, whose CUDA kernel adds with atomics)."""

    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reduced_nll = func in REDUCED_NLL and args[3] != 0  # reduction: 0 none, 1 mean, 2 sum
        if func in NONDETERMINISTIC_ON_CUDA or reduced_nll:
            self.found.add(str(func))
        return func(*args, **(kwargs or {}))


def training_step_ops(model: nn.Module, loss: nn.Module) -> set[str]:
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with NondeterministicOps() as recorder:
            logits, aux = model(torch.randn(2, 3, 64, 64), with_aux=True)
            target = torch.randint(0, logits.shape[1], (2, 64, 64))
            total = loss(logits, target) + (0 if aux is None else loss(aux, target))
            total.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    return recorder.found


@pytest.mark.parametrize("option", semantic_models())
def test_the_models_documented_exact_use_only_deterministic_cuda_kernels(option):
    cfg = compose_config(f"model={option}")
    found = training_step_ops(instantiate(cfg.model).train(), CrossEntropy())
    assert (not found) == (option in EXACT_ON_CUDA), found


@pytest.mark.parametrize("option", group_options("loss"))
def test_every_loss_has_deterministic_kernels_in_deterministic_mode(option):
    cfg = compose_config(f"loss={option}")
    model = instantiate(compose_config("model=unet").model).train()
    assert training_step_ops(model, instantiate(cfg.loss)) == set()


@pytest.mark.parametrize(
    "options",
    [{}, {"class_weights": [1.0, 2.0, 0.5, 3.0]}, {"label_smoothing": 0.1},
     {"class_weights": [1.0, 2.0, 0.5, 3.0], "label_smoothing": 0.1}],
)  # fmt: skip
def test_deterministic_cross_entropy_is_the_same_mean(options):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 9, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 9), generator=generator)
    target[0, :3] = 255  # ignored
    loss = CrossEntropy(**options)
    usual = loss(logits, target)
    (usual_grad,) = torch.autograd.grad(usual, logits)
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = loss(logits, target)
        (deterministic_grad,) = torch.autograd.grad(deterministic, logits)
    finally:
        torch.use_deterministic_algorithms(False)
    assert deterministic.item() == pytest.approx(usual.item(), rel=1e-6)
    torch.testing.assert_close(deterministic_grad, usual_grad)


def test_the_flags_are_set_both_ways_so_no_run_leaks_them_into_the_next(tmp_path):
    make_trainer(tmp_path / "a", nn.CrossEntropyLoss(), deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert (
        torch.is_deterministic_algorithms_warn_only_enabled()
    )  # no deterministic kernel: a warning
    assert torch.backends.cudnn.deterministic
    make_trainer(tmp_path / "b", nn.CrossEntropyLoss(), deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark  # on the CPU: cuDNN autotuning is for CUDA only
