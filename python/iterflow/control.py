"""Flow control: how many runs of a flow execute at once across the whole fleet, in all and
per key, and the key each run carries (docs/guide.md, "Flow control").

The limits are configuration: each worker writes the limits of the flows it serves when it
starts (``upsert_flow_limits``), and the claim enforces them in the database
(``claim_limited``, migration 0008). A run counts while it is leased, so a run that sleeps or
waits holds no place, and a dead worker's places come back when its leases expire.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import validate
from .errors import InvalidArgument

# A run's key: the tenant, customer or account a limit applies to.
KeyFn = Callable[[Any], str]
# The highest limit a flow may state (a larger fleet-wide limit is no limit).
MAX_LIMIT = 1_000_000


@dataclass(frozen=True)
class FlowControl:
    """A flow's limits. ``key`` computes a run's key from the input given to ``start`` when the
    caller passes none; ``key_concurrency`` without a key function limits the runs started
    with an explicit ``key=`` (runs without one share the empty key)."""

    concurrency: int | None = None
    key_concurrency: int | None = None
    key: KeyFn | None = None

    @property
    def keyed(self) -> bool:
        """Claimed with rotation among keys (fairness), even without a limit."""
        return self.key is not None or self.key_concurrency is not None

    def run_key(self, explicit: str | None, input: Any, field: str = "key") -> str | None:
        """The key a new run carries: ``explicit`` if given, else the key function's answer."""
        if explicit is not None or self.key is None:
            return explicit
        try:
            found = self.key(input)
        except Exception as exc:  # noqa: BLE001 - the user's key function refused the input
            raise InvalidArgument(field, f"the flow's key function failed on this input: {exc!r}") from None
        return run_key(found, f"{field} (from the flow's key function)")


def flow_control(concurrency: Any = None, key: Any = None, key_concurrency: Any = None) -> FlowControl | None:
    """Checked limits for ``define_flow`` and the builder; None when the flow has none."""
    if concurrency is None and key is None and key_concurrency is None:
        return None
    if key is not None and not callable(key):
        raise InvalidArgument("key", f"must be a function of the input returning a str, got {validate.show(key)}")
    return FlowControl(
        concurrency=_limit(concurrency, "concurrency"),
        key_concurrency=_limit(key_concurrency, "key_concurrency"),
        key=key,
    )


def run_key(value: Any, field: str = "key") -> str | None:
    """A run's key: None, or non-empty text of at most ``validate.MAX_KEY_BYTES`` bytes."""
    if value is None:
        return None
    return validate.text(value, field, max_bytes=validate.MAX_KEY_BYTES)


def limits_json(flows: Iterable[tuple[str, FlowControl | None]]) -> str:
    """The ``upsert_flow_limits`` parameter: one entry per flow name a worker serves (a flow
    without limits clears what an older deployment stated). Two versions of one flow share
    its limits; the first version that states any wins."""
    rows: dict[str, dict[str, Any]] = {}
    for name, control in flows:
        row = rows.setdefault(name, {"name": name, "concurrency": None, "key_concurrency": None, "keyed": False})
        if control is not None and not (row["concurrency"] or row["key_concurrency"] or row["keyed"]):
            row.update(concurrency=control.concurrency, key_concurrency=control.key_concurrency, keyed=control.keyed)
    return json.dumps(sorted(rows.values(), key=lambda r: r["name"]))


def _limit(value: Any, field: str) -> int | None:
    return None if value is None else validate.integer(value, field, 1, MAX_LIMIT)
