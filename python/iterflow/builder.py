"""The builder: linear flows (with loops) whose shape is known before they run.

Because the shape is static, the engine can check a run's recorded history against the code
before executing anything (docs/replay.md §6) and park a run the code can no longer replay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import validate
from .control import FlowControl, flow_control
from .durations import DeadlineLike, DurationLike, parse_duration
from .errors import InvalidArgument
from .flow import Flow
from .keys import base_of
from .schemas import Schema
from .shape import Shape
from .steps import StepOptions

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True)
class _Step:
    name: str
    fn: Callable[..., Any]
    options: dict[str, Any]


@dataclass(frozen=True)
class _Sleep:
    duration: Any


@dataclass(frozen=True)
class _Signal:
    name: str
    schema: Schema | None
    timeout: Any
    merge: Callable[[Any, Any], Any] | None


@dataclass(frozen=True)
class _Loop:
    until: Callable[[Any], bool]
    stages: tuple[Any, ...]


@dataclass(frozen=True)
class View:
    """What ``output`` functions receive: ``.input`` is the channel."""

    input: Any


def _shape(stages: tuple[Any, ...]) -> Shape:
    kinds: dict[str, str] = {}
    counts: dict[str, int] = {}
    looped: set[str] = set()

    def walk(items: tuple[Any, ...], in_loop: bool) -> None:
        for st in items:
            if isinstance(st, _Loop):
                walk(st.stages, True)
                continue
            kind, name = (("step", st.name) if isinstance(st, _Step)
                          else ("sleep", "sleep") if isinstance(st, _Sleep) else ("signal", st.name))
            base = base_of(kind, name)
            if kinds.setdefault(base, kind) != kind:
                raise InvalidArgument("step", f"{base!r} is used as both a {kinds[base]} and a {kind}")
            if in_loop:
                looped.add(base)
            else:
                counts[base] = counts.get(base, 0) + 1

    walk(stages, False)
    return Shape(kinds, counts, frozenset(looped))


@dataclass(frozen=True)
class FlowBuilder:
    """Immutable: every method returns a new builder."""

    name: str
    _version: int | None = None
    _input: Schema | None = None
    _stages: tuple[Any, ...] = ()
    _output: Callable[[View], Any] | None = None
    _signals: Mapping[str, Schema | None] = field(default_factory=dict)
    _control: FlowControl | None = None

    def version(self, n: int) -> FlowBuilder:
        validate.version(n)
        if self._version is not None and n < self._version:
            raise InvalidArgument("version", f"{n} is lower than the version already set ({self._version})")
        return replace(self, _version=n)

    def concurrency(self, n: int) -> FlowBuilder:
        """At most ``n`` runs of this flow execute at once across the fleet."""
        return self._with_control(concurrency=n)

    def key(self, fn: Callable[[Any], str]) -> FlowBuilder:
        """Each run's key (e.g. the tenant) from its input, when ``start`` is given none."""
        return self._with_control(key=fn)

    def key_concurrency(self, n: int) -> FlowBuilder:
        """At most ``n`` runs per key execute at once across the fleet."""
        return self._with_control(key_concurrency=n)

    def _with_control(self, **change: Any) -> FlowBuilder:
        now = self._control or FlowControl()
        merged = {"concurrency": now.concurrency, "key": now.key, "key_concurrency": now.key_concurrency, **change}
        return replace(self, _control=flow_control(**merged))

    def input(self, schema: Any) -> FlowBuilder:
        return replace(self, _input=Schema.of(schema))

    def step(self, name: str, fn: Callable[..., Any], **options: Any) -> FlowBuilder:
        validate.name(name, "step")
        if not callable(fn):
            raise InvalidArgument("fn", f"step {name!r} needs a callable")
        StepOptions.build(**options)  # validate now, not at the first run
        return replace(self, _stages=(*self._stages, _Step(name, fn, options)))

    def sleep(self, duration: DeadlineLike) -> FlowBuilder:
        if not isinstance(duration, datetime):
            parse_duration(duration, field="sleep")
        return replace(self, _stages=(*self._stages, _Sleep(duration)))

    def signal(self, name: str, schema: Any = None, timeout: DurationLike | None = None,
               merge: Callable[[Any, Any], Any] | None = None) -> FlowBuilder:
        validate.name(name, "signal")
        if timeout is not None:
            parse_duration(timeout, field="timeout")
        sch = Schema.of(schema)
        signals = dict(self._signals)
        if name in signals and signals[name] != sch:
            raise InvalidArgument("signal", f"signal {name!r} is declared twice with different schemas")
        signals[name] = sch
        return replace(self, _stages=(*self._stages, _Signal(name, sch, timeout, merge)), _signals=signals)

    def loop(self, *, until: Callable[[Any], bool], body: Callable[[FlowBuilder], FlowBuilder]) -> FlowBuilder:
        inner = body(FlowBuilder(self.name, _signals=self._signals))
        if not isinstance(inner, FlowBuilder) or not inner._stages:
            raise InvalidArgument("loop", "body must return a builder with at least one stage")
        signals = {**self._signals, **inner._signals}
        return replace(self, _stages=(*self._stages, _Loop(until, inner._stages)), _signals=signals)

    def output(self, fn: Callable[[View], Any]) -> FlowBuilder:
        return replace(self, _output=fn)

    def build(self, *, drift: str | None = None) -> Flow:
        if not self._stages:
            raise InvalidArgument("flow", f"flow {self.name!r} has no stages")
        stages, output = self._stages, self._output

        async def body(ctx: Context, channel: Any) -> Any:
            channel = await _run(ctx, stages, channel)
            return output(View(channel)) if output is not None else channel

        return Flow(
            name=self.name, version=self._version or 1, body=body, input_schema=self._input,
            signal_schemas={k: v for k, v in self._signals.items() if v is not None},
            shape=_shape(stages), drift=validate.drift(drift), control=self._control,
        )


async def _run(ctx: Context, stages: tuple[Any, ...], channel: Any) -> Any:
    for st in stages:
        if isinstance(st, _Step):
            opts = StepOptions.cached(st.options, ctx.default_step_timeout)
            channel = await ctx.run_step(st.name, st.fn, opts, channel)
        elif isinstance(st, _Sleep):
            await ctx.sleep(st.duration)
        elif isinstance(st, _Signal):
            payload = await ctx.signal(st.name, schema=st.schema, timeout=st.timeout)
            channel = st.merge(channel, payload) if st.merge is not None else payload
        else:
            while not st.until(channel):
                channel = await _run(ctx, st.stages, channel)
    return channel


def flow(name: str) -> FlowBuilder:
    """Start a builder flow named ``name``."""
    return FlowBuilder(validate.name(name, "name"))
