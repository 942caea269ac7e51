"""The configuration reference, generated from configs/: every key, its default and its comment.

    python scripts/config_reference.py [out.md]    # prints the page, or writes it to out.md

docs/conf.py calls ``write_page()`` when the docs build, so the page (docs/reference/configs.md,
git-ignored) cannot drift from the configs; tests/unit/test_docs.py checks that every key has a
comment and appears in it.

The configs are hand-written YAML, one key per line with its ``# comment`` beside it, nested
mappings by indentation, block lists of ``- item`` lines and flow values (``[...]``, ``{...}``)
that may run over several lines. A line-based reader keeps the comments that a YAML loader
drops; each file is then rebuilt from what the reader found and compared with PyYAML's reading
of it, so a construct the reader does not understand stops with ``ConfigParseError`` naming the
file and line instead of a wrong page. A key's comment is the one beside it, or else the comment
lines directly above it. Two kinds of key explain themselves and need none: ``_target_`` (its
value names the class or function built) and a key whose value is a single interpolation
(``root: ${data.root}`` follows ``data.root``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The entry points' own configs, in the order the page lists them, with the command each serves.
PRIMARY = {
    "train.yaml": "python train.py",
    "evaluate.yaml": "python evaluate.py",
    "predict.yaml": "python predict.py",
    "export.yaml": "python scripts/export.py",
    "check_data.yaml": "python scripts/check_data.py",
    "baseline.yaml": "python scripts/baseline.py",
}
# Hydra's own settings rather than seg's keys: Python logging's dictConfig schema.
EXCLUDED = ("hydra",)
SELF_EXPLAINED = "self-explained"  # the comment of a key that needs none (see the docstring)

KEY = re.compile(r"(?P<key>[A-Za-z_][\w.\-/]*)\s*:(?:\s+(?P<rest>.*))?$")


class ConfigParseError(ValueError):
    """A config line the reader cannot place; the message names the file and line."""


@dataclass
class Key:
    """One key of a config file."""

    path: tuple[str, ...]  # the nested keys within the file, e.g. ("dataset", "root")
    value: str | None  # the YAML text of a leaf value; None for a block mapping or list
    comment: str  # the comment beside the key (or above it); "" when it has none
    line: int  # 1-based line number in the file
    items: list[str] = field(default_factory=list)  # a block list's items, as YAML text
    item_comments: list[str] = field(default_factory=list)

    @property
    def self_explained(self) -> bool:
        """``_target_`` names what is built; ``${a.b}`` alone follows another key."""
        interpolation = self.value is not None and re.fullmatch(r"\$\{[^{}]+\}", self.value)
        return self.path[-1] == "_target_" or bool(interpolation)


@dataclass
class ConfigFile:
    """A config file read line by line: its description, defaults list and keys."""

    path: Path
    description: str  # the comment lines at the top of the file
    global_package: bool  # ``# @package _global_``: keys are absolute, not under the group
    defaults: list[tuple[str, str, int]]  # (entry as written, comment, line)
    keys: list[Key]


def split_comment(line: str) -> tuple[str, str]:
    """``(content, comment)`` of a line; ``#`` starts a comment outside quotes, after a space."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _depth(text: str) -> int:
    """How many brackets ``text`` leaves open (quotes respected)."""
    depth, quote = 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return depth


def read_config(path: Path) -> ConfigFile:
    """Read one config file; raises ``ConfigParseError`` on what the reader cannot place."""
    lines = path.read_text().splitlines()
    where = f"configs/{path.relative_to(CONFIGS)}" if path.is_relative_to(CONFIGS) else path

    def fail(number: int, why: str) -> ConfigParseError:
        return ConfigParseError(f"{where}:{number}: {why}: {lines[number - 1]!r}")

    description: list[str] = []
    global_package = False
    defaults: list[tuple[str, str, int]] = []
    keys: list[Key] = []
    stack: list[tuple[int, Key]] = []  # (indent, key) of the open block mappings and lists
    above: list[str] = []  # comment lines directly above the current line
    parents: set[tuple[str, ...]] = set()  # keys that hold a block mapping
    seen_key = False
    i = 0
    while i < len(lines):
        number, raw = i + 1, lines[i]
        i += 1
        content, comment = split_comment(raw)
        if not content.strip():
            if comment == "@package _global_":
                global_package = True
            elif comment and not seen_key and not defaults:
                description.append(comment)
            elif comment:
                above.append(comment)
            if not raw.strip():
                above = []
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise fail(number, "a tab in the indentation")
        indent = len(content) - len(content.lstrip())
        text = content.strip()
        if text.startswith(("|", ">")) or re.search(r":\s*[|>][-+]?$", text):
            raise fail(number, "a block scalar (| or >), which this reader does not handle")
        while _depth(text) > 0:  # a flow value continued on the next lines
            if i >= len(lines):
                raise fail(number, "a bracket never closed")
            more, more_comment = split_comment(lines[i])
            i += 1
            text += " " + more.strip()
            comment = " ".join(part for part in (comment, more_comment) if part)
        while stack and indent < stack[-1][0]:
            stack.pop()
        if text.startswith("- ") or text == "-":
            item = text[1:].strip()
            # A list's items sit under its key, indented or at the key's own indent.
            owner = stack[-1][1] if stack else None
            if owner is None or owner.path in parents:
                raise fail(number, "a list item outside a list")
            if owner.path == ("defaults",):
                defaults.append((item, comment, number))
            else:
                owner.items.append(item)
                owner.item_comments.append(comment)
            above = []
            continue
        match = KEY.match(text)
        if not match:
            raise fail(number, "not a 'key: value' line")
        while stack and indent <= stack[-1][0]:
            stack.pop()
        if stack and stack[-1][1].items:
            raise fail(number, "a key inside a list item")
        parent = stack[-1][1].path if stack else ()
        parents.add(parent)
        rest = match["rest"] or ""
        if any(key.path == (*parent, match["key"]) for key in keys):
            raise fail(number, "a key given twice")
        key = Key(
            path=(*parent, match["key"]),
            value=rest or None,
            comment=comment or " ".join(above),
            line=number,
        )
        keys.append(key)
        seen_key = True
        above = []
        if not rest:
            stack.append((indent, key))
    config = ConfigFile(path, " ".join(description), global_package, defaults, keys)
    _check_against_yaml(config, fail)
    return config


def _rebuild(config: ConfigFile) -> dict:
    """The file's data as the reader understood it, for the comparison with PyYAML."""
    data: dict = {}
    if config.defaults:
        data["defaults"] = [yaml.safe_load(item) for item, _, _ in config.defaults]
    for key in config.keys:
        if key.path == ("defaults",):
            continue
        node = data
        for part in key.path[:-1]:
            node = node[part]
        if key.value is not None:
            node[key.path[-1]] = yaml.safe_load(key.value)
        elif key.items:
            node[key.path[-1]] = [yaml.safe_load(item) for item in key.items]
        else:
            node[key.path[-1]] = {}
    return data


def _check_against_yaml(config: ConfigFile, fail) -> None:
    try:
        expected = yaml.safe_load(config.path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise fail(mark.line + 1 if mark else 1, f"not YAML ({error})") from None
    try:
        rebuilt = _rebuild(config)
    except (yaml.YAMLError, KeyError, TypeError) as error:  # e.g. an alias, *name, read alone
        first = config.keys[0].line if config.keys else 1
        raise fail(first, f"a value the line reader cannot read on its own ({error})") from None

    def empty_to_none(node):  # "key:" with nothing under it is null in YAML
        if isinstance(node, dict):
            return {k: None if v == {} else empty_to_none(v) for k, v in node.items()} or None
        return node

    if empty_to_none(rebuilt) != empty_to_none(expected):
        # Name the first key whose value differs (or the first key, if PyYAML has keys the
        # reader did not see).
        wrong = next(
            (
                key
                for key in config.keys
                if _lookup(rebuilt, key.path) != _lookup(expected, key.path)
                and key.value is not None
            ),
            config.keys[0] if config.keys else None,
        )
        raise fail(wrong.line if wrong else 1, "the line reader and PyYAML read this differently")


def _lookup(data, path: tuple[str, ...]):
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return KeyError
        data = data[part]
    return data


def config_files() -> list[Path]:
    """Every config file the reference covers: configs/**/*.yaml less Hydra's own settings."""
    return sorted(
        path
        for path in CONFIGS.rglob("*.yaml")
        if path.relative_to(CONFIGS).parts[0] not in EXCLUDED
    )


def dotted(config: ConfigFile, key: Key) -> str:
    """The key as a command line names it: ``data.dataset.root``, ``trainer.max_iters``."""
    relative = config.path.relative_to(CONFIGS)
    if len(relative.parts) == 1 or config.global_package:
        return ".".join(key.path)
    return ".".join((relative.parts[0], *key.path))


def _escape(text: str) -> str:
    """Markdown-safe prose: the punctuation that would turn into markup is escaped."""
    return re.sub(r"([\\`*_\[\]<>|~$#])", r"\\\1", text)


def _code(text: str) -> str:
    """A value as inline code in a table cell."""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def _value(key: Key) -> str:
    if key.value is not None:
        return _code(key.value)
    if key.items:
        shown = ", ".join(key.items)
        if len(shown) > 60:
            shown = f"{', '.join(key.items[:3])}, ... ({len(key.items)} items)"
        return _code(f"[{shown}]")
    return ""


def _comment(key: Key) -> str:
    if key.comment:
        return _escape(key.comment)
    if key.self_explained:
        return "the class or function built" if key.path[-1] == "_target_" else "follows it"
    return ""


def _table(config: ConfigFile) -> list[str]:
    rows = []
    if config.defaults:
        rows += ["Defaults list:", "", "| entry | comment |", "|---|---|"]
        rows += [f"| {_code(item)} | {_escape(comment)} |" for item, comment, _ in config.defaults]
        rows.append("")
    keys = [key for key in config.keys if key.path != ("defaults",)]
    if keys:
        rows += ["| key | default | comment |", "|---|---|---|"]
        rows += [f"| {_code(dotted(config, k))} | {_value(k)} | {_comment(k)} |" for k in keys]
        rows.append("")
    return rows


def missing_comments() -> list[str]:
    """``configs/<file>:<line>: <key>`` for every key (and defaults entry) without a comment."""
    missing = []
    for path in config_files():
        config = read_config(path)
        name = path.relative_to(REPO)
        missing += [
            f"{name}:{key.line}: {'.'.join(key.path)}"
            for key in config.keys
            if key.path != ("defaults",) and not key.comment and not key.self_explained
        ]
        missing += [
            f"{name}:{line}: defaults entry {item}"
            for item, comment, line in config.defaults
            if not comment and item != "_self_"
        ]
    return missing


def reference() -> str:
    """The Markdown page: the entry points' configs, then each group's options, key by key."""
    files = config_files()
    out = [
        "# Configuration reference",
        "",
        "Generated from `configs/` by `scripts/config_reference.py` when the docs build: every",
        "key with its default and the comment beside it in the YAML file. Keys are written as the",
        "command line names them (`python train.py trainer.max_iters=2000`); a group's option is",
        "chosen with `group=option` (`model=fpn`), and `python train.py --help` prints the",
        "composed config. Hydra's logging settings (`configs/hydra/`) are left out.",
        "",
        "(configs-entry-points)=",
        "## Entry points",
        "",
    ]
    for name, command in PRIMARY.items():
        config = read_config(CONFIGS / name)
        out += [f"### {name}", "", f"`{command}`: {_escape(config.description)}", ""]
        out += _table(config)
    unknown = [p for p in files if p.parent == CONFIGS and p.name not in PRIMARY]
    if unknown:
        raise ConfigParseError(f"a top-level config the reference does not list: {unknown}")
    groups: dict[str, list[Path]] = {}
    for path in files:
        relative = path.relative_to(CONFIGS)
        if len(relative.parts) > 1:
            groups.setdefault(relative.parts[0], []).append(path)
    out += ["(configs-groups)=", "## Groups", ""]
    for group, paths in groups.items():
        out += [f"(configs-{group})=", f"### {group}", ""]
        for path in paths:
            config = read_config(path)
            option = path.relative_to(CONFIGS / group).with_suffix("").as_posix()
            out += [f"#### {group}={option}", ""]
            if config.description:
                out += [_escape(config.description), ""]
            if config.global_package:
                out += ["Keys are global (`# @package _global_`): they override other groups.", ""]
            out += _table(config)
    return "\n".join(out).rstrip() + "\n"


def write_page(target: Path) -> bool:
    """Write the page to ``target`` if its text changed (so Sphinx rereads it only then)."""
    text = reference()
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return True


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_page(Path(sys.argv[1]))
    else:
        sys.stdout.write(reference())
