"""Cursor keys: the deterministic name under which each ctx call's outcome is stored.

A key is a *base* derived from the call's kind and name, plus ``:n`` for the n-th later
occurrence of that base in one execution (loops). Keys must be unambiguous whatever names
users pick: no call may produce another call's key, or replay would hand one call the
recorded outcome of another. See docs/replay.md §2.

The rule: a name is used as is when it contains neither ``:`` nor ``%``; otherwise those two
characters are percent-encoded, so a name part never contains ``:`` and the only ``:`` in a
key are the kind separator and the occurrence suffix. A step's base is its bare name, unless
that name needs encoding or is one of the kind words (``sleep``, ``signal``...), in which case
it is ``step:<encoded name>``. Every other kind's base is ``<kind>:<encoded name>`` (``sleep``,
``now`` and ``log`` are the bare kind). Keys of names without ``:``, ``%`` or a kind word are
exactly what earlier versions wrote; for the others, :func:`legacy_key` gives the key an
earlier version used, which replay still reads (checked against the record's kind and name).
"""

from __future__ import annotations

from functools import lru_cache

KINDS = frozenset({"step", "sleep", "now", "log", "signal", "invoke"})
# kinds whose base is the kind word alone (one call site, no user-chosen name)
BARE_KINDS = frozenset({"sleep", "now", "log"})


def _encoded(name: str) -> str:
    if ":" not in name and "%" not in name:
        return name
    return name.replace("%", "%25").replace(":", "%3A")


def base_of(kind: str, name: str) -> str:
    """The cursor-key base of a call; occurrences add ``:1``, ``:2``..."""
    if kind in BARE_KINDS:
        return kind
    if kind == "step":
        encoded = _encoded(name)
        return encoded if encoded == name and name not in KINDS else f"step:{encoded}"
    return f"{kind}:{_encoded(name)}"


@lru_cache(maxsize=4096)
def bases(kind: str, name: str) -> tuple[str, str]:
    """(the base of this call's keys, the base earlier versions used): cached, since a body
    makes the same calls again and again (every loop iteration, every replay)."""
    return base_of(kind, name), legacy_key(kind, name, 0)


def key_of(kind: str, name: str, occurrence: int) -> str:
    """The key of the ``occurrence``-th (0-based) call with this kind and name."""
    base = base_of(kind, name)
    return base if occurrence == 0 else f"{base}:{occurrence}"


def legacy_key(kind: str, name: str, occurrence: int) -> str:
    """The key versions before the encoding above wrote for this call (ambiguous for names
    ending in ``:<number>``, hence only read, and only for a record of the same kind and name)."""
    base = kind if kind in BARE_KINDS else name if kind == "step" else f"{kind}:{name}"
    return base if occurrence == 0 else f"{base}:{occurrence}"


def occurrence_of(key: str, kind: str, name: str) -> int | None:
    """Which occurrence of (kind, name) ``key`` is, under either scheme; None if neither."""
    for base in (base_of(kind, name), legacy_key(kind, name, 0)):
        if key == base:
            return 0
        head, sep, tail = key.rpartition(":")
        if sep and head == base and tail.isdigit():
            return int(tail)
    return None
