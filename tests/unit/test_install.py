"""Set-up that cannot go wrong silently: a mixed torch/torchvision install is named with its fix."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO


def test_a_mixed_torch_install_is_recognised_with_a_one_line_fix():
    # A CPU torch beside a CUDA torchvision fails inside torchvision's import with this error.
    code = textwrap.dedent("""
        import importlib.abc, sys

        class MixedInstall(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torchvision":
                    raise RuntimeError("operator torchvision::nms does not exist")

        sys.meta_path.insert(0, MixedInstall())
        import seg.train
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: torch ") and "are different builds" in last, last
    assert "pip install --force-reinstall torch torchvision --index-url" in last
    assert "torchvision::nms" not in result.stderr  # torchvision's own frames are not shown
