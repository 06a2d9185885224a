"""dbguard.exposition against prometheus_client (the oracle: the library dbguard exported with
before, Debian's python3-prometheus-client), family by family, byte for byte."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dbguard.exposition import Family, number, render


def _reference(*metrics) -> bytes:
    """prometheus_client's text for these families, `_created` series off (as dbguard had it)."""
    import prometheus_client.metrics as pm
    was = getattr(pm, "_use_created", True)
    pm._use_created = False
    try:
        registry = CollectorRegistry(auto_describe=False)

        class _Fixed:
            def collect(self):
                return list(metrics)
        registry.register(_Fixed())
        return generate_latest(registry)
    finally:
        pm._use_created = was


VALUES = (0, 1, -1, 0.004, 1.5e-5, 123456, 1234567, 12345678, 1048576000, 2 ** 53, 1e16, 1.7e308,
          -2e9, float("inf"), float("-inf"), float("nan"), True, 42.125)


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_numbers_as_prometheus_client_prints_them(value):
    from prometheus_client.utils import floatToGoString
    assert number(value) == floatToGoString(value)


def test_gauges_and_counters_with_labels_help_and_escapes():
    help_ = 'Odd help: a back\\slash, a "quote" and\na newline.'
    label_values = [("a", 'quo"te'), ("back\\slash", "new\nline"), ("ünïcode", "x")]
    ours_g = Family("t_gauge", help_, labels=["zeta", "alpha"])
    ref_g = GaugeMetricFamily("t_gauge", help_, labels=["zeta", "alpha"])
    ours_c = Family("t_events", help_, "counter", labels=["kind", "by"])
    ref_c = CounterMetricFamily("t_events", help_, labels=["kind", "by"])
    for (a, b), v in zip(label_values, VALUES[3:]):
        ours_g.set(v, a, b)
        ref_g.add_metric([a, b], v)
        ours_c.set(abs(v), a, b)
        ref_c.add_metric([a, b], abs(v))
    plain = Family("t_plain", "No labels.").set(2.5)
    ref_plain = GaugeMetricFamily("t_plain", "No labels.", value=2.5)
    empty = Family("t_empty", "Labelled, no series yet.", labels=["x"])
    ref_empty = GaugeMetricFamily("t_empty", "Labelled, no series yet.", labels=["x"])
    assert render([ours_g, ours_c, plain, empty]) == _reference(ref_g, ref_c, ref_plain, ref_empty)


def test_counters_count_as_prometheus_client_counts():
    registry = CollectorRegistry()
    import prometheus_client.metrics as pm
    was = getattr(pm, "_use_created", True)
    pm._use_created = False
    try:
        ref_lab = Counter("t_actions", "Actions.", ["kind", "outcome"], registry=registry)
        ref_one = Counter("t_kills", "Kills.", registry=registry)
        ref_gauge = Gauge("t_seconds", "Seconds.", ["source"], registry=registry)
        ours_lab = Family("t_actions", "Actions.", "counter", ["kind", "outcome"])
        ours_one = Family("t_kills", "Kills.", "counter")
        ours_gauge = Family("t_seconds", "Seconds.", labels=["source"])
        ref_lab.labels("breach", "done")            # a series at zero before its first event
        ours_lab.touch("breach", "done")
        for kind, outcome in (("kill", "done"), ("kill", "failed"), ("kill", "done"), ("cancel", "dry_run")):
            ref_lab.labels(kind, outcome).inc()
            ours_lab.inc(kind, outcome)
        ref_one.inc(0)
        ref_one.inc()
        ours_one.inc()
        ref_gauge.labels("procfs").set(0.004)
        ref_gauge.labels("procfs").set(0.25)
        ours_gauge.set(0.004, "procfs")
        ours_gauge.set(0.25, "procfs")
        assert render([ours_lab, ours_one, ours_gauge]) == generate_latest(registry)
    finally:
        pm._use_created = was


def test_wrong_label_count_is_refused_in_one_line():
    fam = Family("t_x", "X.", labels=["a", "b"])
    with pytest.raises(ValueError, match="1 label value"):
        fam.set(1, "only-one")
    with pytest.raises(ValueError, match="kind 'histogram'"):
        Family("t_h", "H.", "histogram")

