"""A minimal Prometheus registry: counters, gauges and histograms with labels, written
in the text exposition format (version 0.0.4) that every Prometheus scraper reads.

No dependency: the server needs a few dozen samples, not a client library. Updates
come from the decoding thread and the event loop at once, so every read and write
holds the registry's lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape_label(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = registry.lock
        registry.register(self)

    def _key(self, labels: dict[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self, family: str) -> list[str]:
        return [f"# HELP {family} {_escape_help(self.help)}", f"# TYPE {family} {self.kind}"]


class _Scalar(_Metric):
    """One number per label set (counters and gauges)."""

    def __init__(self, registry, name, help, labelnames=()):
        super().__init__(registry, name, help, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = self.header(self.name)
        for key, value in sorted(self._values.items()):
            lines.append(f"{self.name}{_labels(self.labelnames, key)} {_format_value(value)}")
        return lines


class Counter(_Scalar):
    """A value that only goes up. `name` must end in `_total`."""

    kind = "counter"

    def __init__(self, registry, name, help, labelnames=()):
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(registry, name, help, labelnames)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter cannot decrease")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Scalar):
    """A value that goes up and down (requests running, waiting)."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets `le` (upper bounds), plus _sum and _count."""

    kind = "histogram"

    def __init__(self, registry, name, help, buckets: Iterable[float], labelnames=()):
        super().__init__(registry, name, help, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.buckets = tuple(bounds)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}
        if not labelnames:
            self._counts[()] = [0] * len(self.buckets)
            self._sums[()] = 0.0

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: object) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), []))

    def render(self) -> list[str]:
        lines = self.header(self.name)
        for key in sorted(self._counts):
            cumulative = 0
            for bound, count in zip(self.buckets, self._counts[key]):
                cumulative += count
                le = _format_value(bound) if math.isinf(bound) else repr(float(bound))
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, ('le', le))} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_format_value(self._sums[key])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for metric in self._metrics:
                lines.extend(metric.render())
        return "\n".join(lines) + "\n"
