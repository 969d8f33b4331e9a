"""Every config key with its type, default and one-line meaning, read from the schema itself
(pipeline/config.py: the dataclasses and the comment on each field), so `train --help`
cannot go stale: a key without a comment is a test failure, not a silent gap."""

from __future__ import annotations

import dataclasses
import inspect
import re

from pipeline import config

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _meanings(cls) -> dict[str, str]:
    """field name -> the comment at the end of its line in the class body."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _COMMENT.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def keys(cls=config.Config, prefix: str = "") -> list[tuple[str, str, object, str]]:
    """(dotted key, type, default, meaning) for every leaf of the schema, in schema order."""
    out = []
    meanings = _meanings(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += keys(type(value), f"{prefix}{f.name}.")
            continue
        key = f"{prefix}{f.name}"
        meaning = meanings.get(f.name, "")
        choices = config.CHOICES.get(key)
        if choices and not all(c in meaning for c in choices):
            meaning = f"one of {', '.join(choices)}; {meaning}" if meaning else ", ".join(choices)
        out.append((key, str(f.type), value, meaning))
    return out


def help_text() -> str:
    """The key table `train --help` ends with."""
    rows = keys()
    width = max(len(k) for k, *_ in rows)
    lines = ["config keys (set in the YAML or as key=value; defaults < YAML < command line):"]
    section = ""
    for key, kind, default, meaning in rows:
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append("")
        lines.append(f"  {key:<{width}}  {kind} = {default!r}: {meaning}")
    return "\n".join(lines)
