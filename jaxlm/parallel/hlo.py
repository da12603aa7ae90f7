"""Counting collectives in compiled HLO text: what XLA actually inserted for a sharding.

    text = jax.jit(f, ...).lower(...).compile().as_text()
    collective_counts(text)                  # whole program
    collective_counts(text, loop_body=True)  # inside the scanned layer stack's while body

The scanned decoder runs its layers as one `while` loop, so the body's counts are per repeat
of the layer pattern.
"""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_OP = re.compile(r"=\s.*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            out[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            out[current].append(line)
    return out


def _reachable(comps: dict[str, list[str]], roots: list[str]) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            stack.extend(_CALLS.findall(line))
    return seen


def collective_ops(hlo_text: str, loop_body: bool = False) -> list[tuple[str, str]]:
    """(kind, instruction line) of every collective, optionally only those inside while-loop
    bodies (and what they call)."""
    comps = computations(hlo_text)
    if loop_body:
        bodies = [m.group(1) for lines in comps.values() for line in lines
                  if (m := _WHILE_BODY.search(line))]
        names = _reachable(comps, bodies)
    else:
        names = set(comps)
    found = []
    for name in sorted(names):
        for line in comps[name]:
            match = _OP.search(line)
            if match:
                found.append((match.group(1), line.strip()))
    return found


def collective_counts(hlo_text: str, loop_body: bool = False) -> dict[str, int]:
    counts = collections.Counter(kind for kind, _ in collective_ops(hlo_text, loop_body))
    return {kind: counts.get(kind, 0) for kind in COLLECTIVES}
