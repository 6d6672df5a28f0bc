"""Every config key with its type, default and meaning, read from config.py itself: the
dataclass fields give the key, type and default, the comment above a field (or after it on its
line) gives the meaning. `launch/train.py --help` prints this list, so it cannot drift from the
code; a key without a comment is a test failure (tests/test_first_hour.py).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass

from . import config
from .config import RunConfig, _type_name


@dataclass(frozen=True)
class Key:
    name: str        # dotted, as on the command line; <task> stands for a name you choose
    type: str
    default: str
    meaning: str     # the field's comment, whole
    section: str     # the dataclass's docstring (its first sentence), or ""

    @property
    def summary(self) -> str:
        """The meaning's first sentence (a period outside parentheses, not of "e.g.")."""
        depth = 0
        text = self.meaning
        for i, ch in enumerate(text):
            depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(ch, 0)
            if ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " ") \
                    and not text[max(0, i - 3):i].endswith(("e.g", "i.e", "etc", "vs")):
                return text[:i]
        return text.rstrip(".")


def _comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment lines above the field (or after it on its line)."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            above, i = [], item.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            line = lines[item.lineno - 1]
            after = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[node.name, item.target.id] = " ".join(part for part in [*above, after] if part)
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return str(value).replace("'", "") if value else ("[]" if isinstance(value, list) else "{}")
    return str(value)


def keys() -> list[Key]:
    """Every key of a run config, in the order config.py declares them."""
    comments = _comments()
    hints = {}
    out: list[Key] = []

    def walk(cls, prefix: str, section: str) -> None:
        hints[cls] = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[cls][f.name]
            name = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                doc = (inspect.getdoc(tp) or "").split("\n\n")[0].replace("\n", " ")
                walk(tp, name + ".", doc if not doc.startswith(tp.__name__ + "(") else "")
                continue
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                inner = typing.get_args(tp)[1]
                out.append(Key(name, _type_name(tp), _default(f), comments.get((cls.__name__, f.name), ""), section))
                walk(inner, f"{name}.<task>.", comments.get((cls.__name__, f.name), ""))
                continue
            out.append(Key(name, _type_name(tp), _default(f), comments.get((cls.__name__, f.name), ""), section))

    walk(RunConfig, "", "")
    return out


def render(width: int = 100) -> str:
    """The key list as --help prints it: one line per key (type, default, first sentence of its
    meaning), grouped by section."""
    lines = ["config keys (set them in the --config YAML, or as key.sub=value on the command line; "
             "--show-config prints a command's resolved config):"]
    last = None
    for k in keys():
        head = k.name.split(".")[0]
        if head != last:
            lines.append("")
            last = head
        lines.append(f"  {k.name} ({k.type}; default {k.default})")
        lines.append(f"      {k.summary}")
    return "\n".join(lines) + "\n"
