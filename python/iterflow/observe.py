"""Metrics hooks that can never break a run (docs/operations.md §6).

A raising hook is swallowed and warned about once per hook name; hooks are looked up by
attribute, so a metrics object implements only the ones it cares about.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

HOOKS = (
    "run_started", "run_completed", "run_failed", "run_suspended", "run_continued", "step_finished",
    "signal_delivered", "reconciler_sweep", "step_limit", "sticky_cache",
)


_NO_SPAN = contextlib.nullcontext()
_UNKNOWN = object()


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


class Hooks:
    def __init__(self, metrics: Any, log: logging.Logger) -> None:
        self._metrics = metrics
        self._log = log
        self._warned: set[str] = set()
        self._otel = _otel()
        self._tracer = self._otel.get_tracer("iterflow") if self._otel is not None else None
        self._provider_from_env = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ

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

    def span(self, name: str, attributes: Callable[[], dict[str, Any]]) -> contextlib.AbstractContextManager[None]:
        """An OpenTelemetry span once a tracer provider is configured; otherwise nothing.

        Called for every step. Having ``opentelemetry-api`` installed is not enough: until the
        application sets a provider every span is a no-op, and building one (attributes
        included, hence the callable) costs more than a memoized step.
        """
        if self._tracer is None or not self._tracing():
            return _NO_SPAN
        return self._traced(name, attributes())

    def _tracing(self) -> bool:
        """Whether spans go anywhere; checked per call because a provider can be set at any time.

        ``get_tracer_provider()`` reads the environment on every call while none is set, which
        costs more than a step: the API module's global is read first, where it exists.
        """
        otel = self._otel
        try:
            if getattr(otel, "_TRACER_PROVIDER", _UNKNOWN) is None and not self._provider_from_env:
                return False
            provider = otel.get_tracer_provider()
            return not isinstance(provider, (otel.ProxyTracerProvider, otel.NoOpTracerProvider))
        except Exception as exc:  # noqa: BLE001
            self._warn_once("span", exc)
            return False

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
