"""The arrows point down: the engine knows no task, no dataset and no config; datasets, models
and restore know no engine; the checkpoint and device modules know nothing of seg. Checked on
the source, so a new import that points up fails here, naming the file and the module."""

import ast

import pytest

from tests.conftest import REPO

SEG = REPO / "seg"
ENTRY_MODULES = {"seg.train", "seg.evaluate", "seg.predict", "seg.export", "seg.doctor",
                 "seg.sweep", "seg.config"}  # fmt: skip
# Module prefix -> the seg modules it may import (by prefix); any other seg import is refused.
ALLOWED = {
    "seg.engine": ("seg.engine", "seg.checkpoint", "seg.device", "seg.visualize"),
    "seg.data": ("seg.data",),
    "seg.checkpoint": (),
    "seg.device": (),
    "seg.models": ("seg.checkpoint",),
    "seg.restore": ("seg.checkpoint", "seg.config", "seg.device"),
    "seg.prediction": (),
    "seg.tasks": (
        "seg.tasks",
        "seg.data",  # what a dataset's files mean (Cityscapes' label ids) for predictions
        "seg.prediction",
        "seg.engine",
        "seg.inference",
        "seg.metrics",
        "seg.visualize",
        "seg.checkpoint",
        "seg.device",
        "seg.models",
        "seg.panoptic",
    ),
}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def seg_imports(path) -> set[str]:
    """The seg modules ``path`` imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from seg import restore`` imports seg.restore
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {node.module} if node.module != "seg" else set(names)
    return {name for name in found if name == "seg" or name.startswith("seg.")}


def within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("path", sorted(SEG.rglob("*.py")), ids=lambda p: module_name(p))
def test_imports_point_down(path):
    name = module_name(path)
    rule = next((prefix for prefix in ALLOWED if within(name, [prefix])), None)
    if rule is None:
        return  # entry modules and the semantic helpers may import what they need
    wrong = sorted(i for i in seg_imports(path) if i != "seg" and not within(i, ALLOWED[rule]))
    assert not wrong, (
        f"{path.relative_to(REPO)} imports {wrong}; {rule} may import only {ALLOWED[rule]}"
    )


def test_no_engine_module_imports_a_task_or_an_entry_point():
    for path in (SEG / "engine").rglob("*.py"):
        imported = seg_imports(path)
        assert not {i for i in imported if within(i, ["seg.tasks", *ENTRY_MODULES])}, path


def test_the_rule_catches_an_import_that_points_up(tmp_path):
    module = tmp_path / "seg" / "engine" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from seg.data.loader import train_loader\nimport seg.tasks.semantic\n")
    assert seg_imports(module) == {"seg.data.loader", "seg.tasks.semantic"}
