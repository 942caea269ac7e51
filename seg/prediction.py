"""Where ``predict.py``'s outputs go: each input's path under a format folder, and inputs
whose outputs would be one file refused (by predict.py, and by a task's writer for a flat
format)."""

from collections import Counter
from pathlib import Path


def output_paths(files: list[Path], base: Path) -> tuple[list[Path], list[Path]]:
    """Each input's output path inside a format folder: its path under ``base`` with the suffix
    .png. Inputs that would share one (``img.jpg`` and ``img.png``) keep their own suffix
    (``img.jpg.png``, ``img.png.png``), so that no output replaces another. Returns the paths
    and the inputs so renamed."""
    plain = [file.relative_to(base).with_suffix(".png") for file in files]
    uses = Counter(plain)
    paths, renamed = [], []
    for file, path in zip(files, plain, strict=True):
        if uses[path] > 1:
            path = path.with_name(file.name + ".png")
            renamed.append(file)
        paths.append(path)
    refuse_clashes(files, paths, "")
    return paths, renamed


def refuse_clashes(files: list[Path], paths: list[Path], why: str) -> None:
    """Refuse inputs whose output ``paths`` are one file, naming them (``why``: which format)."""
    inputs: dict[Path, list[str]] = {}
    for file, path in zip(files, paths, strict=True):
        inputs.setdefault(path, []).append(str(file))
    clashes = [
        f"{' and '.join(names)} -> {path}" for path, names in inputs.items() if len(names) > 1
    ]
    if clashes:
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise ValueError(
            f"inputs written to the same output file{why}: {'; '.join(clashes[:5])}{more}; "
            "rename them or predict them in separate runs"
        )
