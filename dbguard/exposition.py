"""Prometheus text exposition (format 0.0.4): the counters and gauges with labels dbguard exports.

prometheus_client brought http.server, wsgiref, email, urllib.request and more into the
daemon: about 3.6 MiB of its RSS at rest, for a page of text (docs/metrics.md names every
family). The text is the one prometheus_client 0.16 wrote with `_created` series off, byte
for byte (tests/unit/test_exposition.py compares the two), so names, help, types and the
number format scrapers and promtool see are unchanged.
"""
from __future__ import annotations

import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def number(value: float) -> str:
    """A sample value as Go (and so Prometheus) prints it: +Inf, NaN, 1.048576e+09."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    # Go switches to an exponent from 1e7 on, Python's repr only from 1e16.
    if d > 0 and dot > 6:
        return f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.") + f"e+0{dot - 1}"
    return s


def _escape(text: str, quote: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


class Family:
    """One metric family: its samples by label values, in the order they first appeared.
    A counter's name is given without `_total`; the exposition adds it, as Prometheus wants."""

    __slots__ = ("name", "help", "kind", "labels", "samples")

    def __init__(self, name: str, help: str, kind: str = "gauge", labels: tuple[str, ...] | list[str] = ()):
        if kind not in ("gauge", "counter"):
            raise ValueError(f"metric {name}: kind {kind!r}, expected gauge or counter")
        self.name = name + "_total" if kind == "counter" else name
        self.help = help
        self.kind = kind
        self.labels = tuple(labels)
        self.samples: dict[tuple[str, ...], float] = {} if self.labels else {(): 0.0}

    def _key(self, values: tuple) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"metric {self.name}: {len(values)} label value(s) for labels {self.labels}")
        return tuple(str(v) for v in values)

    def set(self, value: float, *label_values) -> "Family":
        self.samples[self._key(label_values)] = float(value)
        return self

    def inc(self, *label_values, by: float = 1.0) -> None:
        key = self._key(label_values)
        self.samples[key] = self.samples.get(key, 0.0) + by

    def touch(self, *label_values) -> None:
        """The series exists from now on, at 0 until it moves (increase() works from the first event)."""
        self.samples.setdefault(self._key(label_values), 0.0)

    def text(self) -> str:
        lines = [f"# HELP {self.name} {_escape(self.help, False)}", f"# TYPE {self.name} {self.kind}"]
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        for values, value in self.samples.items():
            labels = ",".join(f'{self.labels[i]}="{_escape(values[i], True)}"' for i in order)
            lines.append(f"{self.name}{{{labels}}} {number(value)}" if labels else f"{self.name} {number(value)}")
        return "\n".join(lines) + "\n"


def render(families) -> bytes:
    """The exposition of `families`, in their order."""
    return "".join(f.text() for f in families).encode()
