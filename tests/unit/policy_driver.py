"""Drive a Policy the way the daemon does: one PolicyState across snapshots, each snapshot
assessed (assess.assess) and then decided, kills the executor skipped fed back by `learn`."""
from __future__ import annotations

from dbguard.assess import assess
from dbguard.model import Action, Outcome, Proc, Role, Snapshot
from dbguard.policy import Policy, PolicyState


class Driven:
    def __init__(self, policy: Policy, state: PolicyState | None = None):
        self.policy = policy
        self.state = state or PolicyState()
        self.limit: int | None = None       # the last snapshot's limit, for verdict() on a bare process

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def _seen(self, snap: Snapshot) -> Snapshot:
        self.limit = snap.memory.limit_bytes
        return snap

    def decide(self, snap: Snapshot):
        a = assess(snap.memory, self.policy.cfg.pressure, self.state.levels, snap.ts)
        return self.policy.decide(self._seen(snap), a, self.state)

    def candidates(self, snap: Snapshot):
        return self.policy.candidates(self._seen(snap))

    def kernel_view(self, snap: Snapshot):
        return self.policy.kernel_view(self._seen(snap))

    def ranked(self, snap: Snapshot):
        return self.policy.ranked(self._seen(snap))

    def verdict(self, p: Proc, role: Role, self_pid: int):
        return self.policy.judge.verdict(p, role, self_pid, self.limit)

    def kill_not_done(self, a: Action) -> None:
        self.policy.learn(self.state, a, Outcome.skipped("pressure fell before the kill"))

    def thresholds(self) -> dict[str, int | None]:
        """What rss_above/pss_above multiples resolve against (dbguard.units.THRESHOLDS)."""
        return {"kill.min_rss": self.policy.cfg.kill.min_rss, "limit": self.limit}
