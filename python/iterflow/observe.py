"""Metrics hooks that can never break a run (SPEC 2.10).

A raising hook is swallowed and warned about once per hook name; hooks are looked up by
attribute, so a metrics object implements only the ones it cares about.
"""

from __future__ import annotations

import logging
from typing import Any

HOOKS = (
    "run_started", "run_completed", "run_failed", "run_suspended", "step_finished",
    "signal_delivered", "reconciler_sweep",
)


class Hooks:
    def __init__(self, metrics: Any, log: logging.Logger) -> None:
        self._metrics = metrics
        self._log = log
        self._warned: set[str] = set()

    def emit(self, name: str, *args: Any) -> None:
        if self._metrics is None:
            return
        try:
            hook = (self._metrics.get(name) if isinstance(self._metrics, dict)
                    else getattr(self._metrics, name, None))
            if hook is not None:
                hook(*args)
        except Exception as exc:  # noqa: BLE001 - observability must not affect control flow
            if name not in self._warned:
                self._warned.add(name)
                self._log.warning("iterflow metrics hook %s raised %r; ignoring it from now on", name, exc)
