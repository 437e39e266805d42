"""The deployment guide's steps, extracted exactly from the Markdown.

A step is a fenced block preceded by a marker comment, or a marker alone:

- `<!-- doctest: run as=saia|root [background] -->`: a shell block, run by bash as the
  functional account (login shell, its own environment) or as root on the web host;
- `<!-- doctest: file as=saia|root path=P -->`: the block is the content of file P;
- `<!-- doctest: check agent-config -->`: an agent config that is only validated (it
  names a real cluster's paths);
- `<!-- doctest: copy SRC to=DEST -->`: a step the text describes (copying a file from
  the web host to the login node), carried out by the test;
- `<!-- doctest: skip (why) -->`: a block that is not run.

Every `sh` block must carry a marker, so that no command goes untested by oversight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MARKER = re.compile(r"^<!-- doctest: (\S+)(.*?) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")


class GuideError(Exception):
    """The Markdown breaks the marker rules; str() names the file and line."""


@dataclass(frozen=True)
class Step:
    kind: str  # run, file, check, copy, skip
    where: str  # "FILE:LINE", for messages
    text: str = ""
    attrs: dict[str, str] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()


def _parse_attrs(rest: str) -> tuple[dict[str, str], frozenset[str]]:
    attrs, flags = {}, set()
    for word in rest.split():
        if "=" in word:
            key, value = word.split("=", 1)
            attrs[key] = value
        else:
            flags.add(word)
    return attrs, frozenset(flags)


def _block(lines: list[str], start: int, where: str) -> tuple[str, str, int]:
    """The fenced block opening at `start`: (language, text, index after it)."""
    opening = FENCE.match(lines[start]) if start < len(lines) else None
    if opening is None:
        raise GuideError(f"{where}: the marker must be followed by a fenced block")
    end = start + 1
    while end < len(lines) and not lines[end].startswith("```"):
        end += 1
    if end == len(lines):
        raise GuideError(f"{where}: unclosed block")
    return opening.group(1), "\n".join(lines[start + 1 : end]) + "\n", end + 1


def steps(path: Path) -> list[Step]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Step] = []
    index = 0
    while index < len(lines):
        where = f"{path.name}:{index + 1}"
        marker = MARKER.match(lines[index])
        fence = FENCE.match(lines[index])
        if marker:
            kind, rest = marker.group(1), marker.group(2)
            attrs, flags = _parse_attrs(rest if kind != "skip" else "")
            if kind == "copy":
                source = rest.split()[0]
                found.append(Step(kind, where, attrs=attrs | {"from": source}))
                index += 1
                continue
            _language, text, index = _block(lines, index + 1, where)
            if kind != "skip":
                found.append(Step(kind, where, text, attrs, flags))
            continue
        if fence:
            language, _text, index = _block(lines, index, where)
            if language == "sh":
                raise GuideError(f"{where}: a sh block without a doctest marker")
            continue
        index += 1
    return found
