"""Metrics hooks that can never break a run (SPEC 2.10).

A raising hook is swallowed and warned about once per hook name; hooks are looked up by
attribute, so a metrics object implements only the ones it cares about.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

HOOKS = (
    "run_started", "run_completed", "run_failed", "run_suspended", "step_finished",
    "signal_delivered", "reconciler_sweep",
)


def _tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("iterflow")


class Hooks:
    def __init__(self, metrics: Any, log: logging.Logger) -> None:
        self._metrics = metrics
        self._log = log
        self._warned: set[str] = set()
        self._tracer = _tracer()

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

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
        """An OpenTelemetry span when ``opentelemetry-api`` is installed; otherwise nothing.

        Called for every step: without a tracer it costs one attribute check, not a generator.
        """
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._traced(name, attributes)

    @contextlib.contextmanager
    def _traced(self, name: str, attributes: dict[str, Any]) -> Iterator[None]:
        """Failures of the tracing SDK are swallowed like hook failures: a span can never fail a run."""
        span_cm = None
        if self._tracer is not None:
            try:
                span_cm = self._tracer.start_as_current_span(name, attributes=attributes)
                span_cm.__enter__()
            except Exception as exc:  # noqa: BLE001
                span_cm = None
                self._warn_once("span", exc)
        try:
            yield
        finally:
            if span_cm is not None:
                try:
                    span_cm.__exit__(None, None, None)
                except Exception as exc:  # noqa: BLE001
                    self._warn_once("span", exc)

    def _warn_once(self, name: str, exc: BaseException) -> None:
        if name not in self._warned:
            self._warned.add(name)
            self._log.warning("iterflow observability %s raised %r; ignoring it from now on", name, exc)
