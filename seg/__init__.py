"""seg: train and evaluate image-segmentation models with PyTorch (docs/index.md)."""


def _check_torch_install() -> None:
    """Recognise a mixed install before anything else fails in its own words: a CPU build of
    torch beside a CUDA build of torchvision (or two releases that do not belong together)
    fails on import with "operator torchvision::nms does not exist"."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        import torch

        raise ImportError(
            f"torch {torch.__version__} and the installed torchvision are different builds (a "
            "CPU torch beside a CUDA torchvision, or releases that do not pair): reinstall both "
            "from one index, e.g. pip install --force-reinstall torch torchvision --index-url "
            "https://download.pytorch.org/whl/cpu (or without --index-url for the CUDA builds)"
        ) from None


_check_torch_install()
