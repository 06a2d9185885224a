"""What woke the loop for each scope's cycle (watch.woken_by, said in level_change records):
its own kernel sources, another scope's, the daemon's descriptors, or the poll."""
from __future__ import annotations

from types import SimpleNamespace

from dbguard import daemon as daemon_mod
from dbguard.config import from_dict
from dbguard.daemon import Daemon
from dbguard.watch import woken_by


def test_own_sources_are_named_and_others_only_summed_up():
    assert woken_by({"psi"}, set(), False) == ("psi",)
    assert woken_by({"limit", "psi"}, set(), False) == ("limit", "psi")
    assert woken_by(set(), {"psi"}, False) == ("another scope",)
    assert woken_by(set(), set(), True) == ("signal or BPF event",)
    assert woken_by({"psi"}, {"limit"}, True) == ("psi", "another scope", "signal or BPF event")


def test_nothing_fired_is_the_poll():
    assert woken_by(set(), set(), False) == ("interval",)
    assert woken_by({"fd"}, {"fd"}, False) == ("interval",)     # a monitor's own wake fd is no scope's source


def _daemon(monkeypatch, fire: dict[str, set[str]], fd: bool) -> Daemon:
    """A daemon with scopes "a" and "b" whose wait_any fires what `fire` says (and the daemon's fd)."""
    d = Daemon(from_dict({"general": {"interval": 0.05}}))
    monitors = {n: SimpleNamespace(fired=set()) for n in ("a", "b")}
    watches = [SimpleNamespace(name=n, monitor=m, arm=lambda mark: None, woken_by=("first cycle",))
               for n, m in monitors.items()]
    d.sensor = SimpleNamespace(watches=watches)

    def wait_any(sources, timeout, wake_fds=frozenset(), high_not_before=0.0):
        for n, m in monitors.items():
            m.fired = set(fire.get(n, set()))
        return set().union(*fire.values()) | ({"fd"} if fd else set())
    monkeypatch.setattr(daemon_mod, "wait_any", wait_any)
    monkeypatch.setattr(daemon_mod, "next_mark_bytes", lambda *a: None)
    answers = [SimpleNamespace(watch=w, assessment=SimpleNamespace(pressed=False, reading=None, now=None))
               for w in watches]
    d._wait(answers)
    return d


def test_wait_says_per_scope_which_source_woke_it(monkeypatch):
    d = _daemon(monkeypatch, {"a": {"psi"}}, fd=False)
    assert {w.name: w.woken_by for w in d.watches} == {"a": ("psi",), "b": ("another scope",)}


def test_wait_that_timed_out_says_interval(monkeypatch):
    d = _daemon(monkeypatch, {}, fd=False)
    assert {w.name: w.woken_by for w in d.watches} == {"a": ("interval",), "b": ("interval",)}


def test_a_signal_is_not_a_scope_source(monkeypatch):
    d = _daemon(monkeypatch, {"b": {"limit"}}, fd=True)
    assert {w.name: w.woken_by for w in d.watches} == {"a": ("another scope", "signal or BPF event"),
                                                        "b": ("limit", "signal or BPF event")}
