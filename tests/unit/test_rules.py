"""[[policy.rules]]: matching, first-match semantics, kill order, the kernel's share, validation."""
from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbguard import config
from dbguard.cli import main as cli_main
from dbguard.errors import ConfigError
from dbguard.model import ActionKind, Level, MemoryReading, Proc, Role, Snapshot
from dbguard.policy import Policy
from policy_driver import Driven
from dbguard.rules import RuleSet, compile_glob
from dbguard.units import parse_threshold

MiB = 1024 * 1024
LIMIT = 1000 * MiB
CG = "/lab"
SELF = 999


def reading(used_mib: float) -> MemoryReading:
    return MemoryReading(cgroup="/sys/fs/cgroup/memory/lab", cgroup_version=1, usage_bytes=int(used_mib * MiB),
                         limit_bytes=LIMIT, psi_some_avg10=0.0, psi_full_avg10=0.0)


def proc(pid: int, rss_mib: float, *, memcg: str = CG, exe: str = "/usr/bin/python3", uid: int = 1000,
         comm: str = "hog") -> Proc:
    return Proc(pid=pid, start_time=pid * 10, ppid=100, uid=uid, comm=comm, exe=exe, cmdline=comm,
                rss_bytes=int(rss_mib * MiB), memcg=memcg, oom_score_adj=0)


def snapshot(procs: list[Proc], roles: dict[int, Role] | None = None, used_mib: float = 500,
             ts: float = 0.0) -> Snapshot:
    roles = dict(roles or {})
    for p in procs:
        roles.setdefault(p.pid, Role.OTHER)
    return Snapshot(ts=ts, memory=reading(used_mib), procs={p.pid: p for p in procs}, roles=roles,
                    databases=(), self_pid=SELF)


def make(rules: list[dict], *, tiers: list[str] | None = None, uids: dict[str, int] | None = None,
         kill: dict | None = None, pss: "FakePss | None" = None, **policy_keys) -> Driven:
    pol = {"rules": rules, **policy_keys}
    if tiers:
        pol["tiers"] = tiers
    data = {"policy": pol, "kill": {"protect_exe": [], **(kill or {})}}
    return Driven(Policy(config.from_dict(data), watched_memcg=CG, rule_uids=uids or {}, pss_reader=pss))


class FakePss:
    """A PSS reader from a table (pid -> MiB; missing: unreadable) that counts its reads."""

    def __init__(self, mib: dict[int, float] | None = None):
        self.bytes = {pid: int(m * MiB) for pid, m in (mib or {}).items()}
        self.reads: list[int] = []

    def __call__(self, p: Proc) -> int | None:
        self.reads.append(p.pid)
        return self.bytes.get(p.pid)


def verdict(pol: Driven, p: Proc, role: Role = Role.OTHER):
    return pol.verdict(p, role, SELF)


# --- matching --------------------------------------------------------------------------------

def test_each_condition_and_lists_are_any_of():
    pol = make([
        {"name": "batch", "cgroup": "/lab/batch.slice/*", "action": "prefer", "weight": 3},
        {"name": "tools", "exe": ["/opt/tools/*", "/usr/local/bin/etl"], "action": "kill"},
        {"name": "alice", "user": ["alice", "2000"], "tier": "default"},
        {"name": "huge", "rss_above": "2x kill.min_rss", "action": "kill"},
        {"name": "quarter", "rss_above": "0.25x limit", "action": "prefer"},
        {"name": "sized", "rss_above": "40MiB", "action": "prefer", "weight": 2},
    ], uids={"alice": 1500})
    assert verdict(pol, proc(21, 40, memcg="/lab/batch.slice/job-1/step")).rule == 'rules[0] "batch"'
    assert verdict(pol, proc(2, 40, memcg="/lab/batch.slicex")).rule != 'rules[0] "batch"'
    assert verdict(pol, proc(3, 1, exe="/usr/local/bin/etl")).rule_index == 1
    assert verdict(pol, proc(4, 1, exe="/opt/tools/x/y")).rule_index == 1
    assert verdict(pol, proc(5, 1, uid=1500)).rule_index == 2
    assert verdict(pol, proc(6, 1, uid=2000)).rule_index == 2
    # min_rss is 32 MiB: "2x" means above 64 MiB, strictly
    assert verdict(pol, proc(7, 64)).rule_index == 5
    assert verdict(pol, proc(8, 65)).rule_index == 3
    # "limit" is the watched cgroup's limit, known once a snapshot was seen
    assert verdict(pol, proc(9, 300)).rule_index == 3
    pol2 = make([{"rss_above": "0.25x limit", "action": "kill"}])
    assert verdict(pol2, proc(9, 300)).rule_index is None, "no limit known yet: the rule does not match"
    pol2.candidates(snapshot([proc(9, 300)]))
    assert verdict(pol2, proc(9, 300)).rule_index == 0
    assert verdict(pol2, proc(10, 200)).rule_index is None


def test_role_condition_and_unresolved_user_matches_nobody():
    pol = make([{"role": "other", "user": "nosuchuser", "action": "kill"}, {"role": "other", "tier": "default"}])
    assert verdict(pol, proc(21, 100, uid=0)).rule_index == 1


def test_first_match_decides_even_when_a_later_rule_is_more_specific():
    pol = make([{"cgroup": "/lab/*", "tier": "free"},
                {"cgroup": "/lab/premium/*", "action": "protect", "tier": "premium"}],
               tiers=["free", "premium"])
    v = verdict(pol, proc(21, 100, memcg="/lab/premium/a"))
    assert v.rule_index == 0 and v.candidate and v.tier == "free"


def test_database_processes_stay_protected_whatever_a_rule_says():
    pol = make([{"name": "wide", "cgroup": "/lab/*", "action": "kill"}])
    v = verdict(pol, proc(21, 500, memcg="/lab/pg", exe="/usr/lib/postgresql/15/bin/postgres"), Role.PG_BACKEND)
    assert v.protected and not v.candidate and v.rule == "built-in: database"
    assert 'rules[0] "wide" would kill it' in v.why
    # a protect rule can name them too (a tier for the report); still protected
    pol = make([{"role": ["pg_backend", "postmaster"], "action": "protect", "tier": "premium"}],
               tiers=["free", "premium"])
    v = verdict(pol, proc(2, 500, exe="/usr/lib/postgresql/15/bin/postgres"), Role.POSTMASTER)
    assert v.protected and v.tier == "premium" and v.rule_index == 0 and "built-in: database" in v.rule


@pytest.mark.parametrize("role", ["pg_backend", "postmaster", "mysqld", "pg_auxiliary", "dbguard", "init",
                                  "kernel_thread"])
@pytest.mark.parametrize("action", ["kill", "prefer", "default"])
def test_a_rule_naming_a_database_role_may_only_protect(role, action):
    with pytest.raises(ConfigError, match=rf"^policy.rules\[0\]: role {role} is always protected"):
        config.from_dict({"policy": {"rules": [{"role": role, "action": action}]}})


def test_safety_comes_before_any_rule():
    pol = make([{"action": "kill"}])
    assert verdict(pol, proc(1, 100)).protected
    assert verdict(pol, proc(SELF, 100)).protected
    kt = Proc(pid=2, start_time=1, ppid=0, uid=0, comm="kthreadd", exe="", cmdline="", rss_bytes=0, memcg="/",
              oom_score_adj=0, kernel_thread=True)
    assert verdict(pol, kt).protected


def test_kill_section_protections_hold_before_rules_prefer_exe_after():
    pol = make([{"action": "kill", "cgroup": "/lab*"}, {"exe": "/opt/*", "tier": "default"}],
               kill={"protect_exe": ["/usr/sbin/sshd"], "prefer_exe": ["/opt/*", "/srv/*"]})
    v = verdict(pol, proc(21, 100, exe="/usr/sbin/sshd"))
    assert v.protected and v.rule == "kill.protect_exe"
    v = verdict(pol, proc(2, 100, exe="/opt/x", memcg="/other"))
    assert v.rule_index == 1 and not v.preferred, "a rule that matched decides, prefer_exe does not"
    pol = make([], kill={"prefer_exe": ["/srv/*"]})
    v = verdict(pol, proc(3, 100, exe="/srv/x"))
    assert v.preferred and v.rule == "kill.prefer_exe" and v.candidate


def test_protect_rule_and_left_alone_outside_the_watched_cgroup():
    pol = make([{"name": "keep", "exe": "/usr/bin/important", "action": "protect"},
                {"name": "all", "action": "kill"}])
    v = verdict(pol, proc(21, 500, exe="/usr/bin/important"))
    assert v.protected and v.rule == 'rules[0] "keep"' and v.action == "protect"
    v = verdict(pol, proc(2, 500, memcg="/elsewhere"))
    assert not v.candidate and not v.protected and "outside the watched" in v.why and v.rule_index == 1


def test_kill_rule_ignores_min_rss_others_do_not():
    pol = make([{"exe": "/opt/*", "action": "kill"}, {"exe": "/srv/*", "action": "prefer"}])
    assert verdict(pol, proc(21, 1, exe="/opt/a")).candidate
    assert not verdict(pol, proc(2, 1, exe="/srv/a")).candidate
    assert not verdict(pol, proc(3, 1)).candidate


# --- pss_above --------------------------------------------------------------------------------

def test_pss_above_holds_on_pss_and_is_read_only_for_processes_that_reach_it():
    pss = FakePss({21: 30, 22: 90, 23: 150, 24: 10, 25: 300})
    pol = make([{"name": "keep", "exe": "/opt/keep", "action": "protect"},
                {"name": "shared-hog", "pss_above": "2x kill.min_rss", "exe": "/usr/bin/*", "action": "kill"},
                {"name": "quarter", "pss_above": "0.25x limit", "action": "prefer"}], pss=pss)
    pol.candidates(snapshot([proc(1000, 1)]))            # the limit (1000 MiB) is known from now on
    # 21: RSS 200 MiB but PSS 30 MiB (its memory is shared): no pss rule holds, though
    # an rss_above rule with the same threshold would
    v = verdict(pol, proc(21, 200))
    assert v.rule == "default" and v.pss_bytes == 30 * MiB and "rss 200 MiB, pss 30 MiB" in v.why
    assert pss.reads == [21], "read once for the two pss rules it reached"
    # 23: PSS above 64 MiB
    v = verdict(pol, proc(23, 200))
    assert v.rule == 'rules[1] "shared-hog"' and v.action == "kill" and "pss 150 MiB" in v.why
    assert "pss > 2x kill.min_rss (= 64 MiB)" in v.why
    # 25: the first pss rule's exe does not hold (tested before PSS); the second holds (> 250 MiB)
    assert verdict(pol, proc(25, 400, exe="/opt/x")).rule_index == 2
    # decided by an earlier rule: never read
    pss.reads.clear()
    assert verdict(pol, proc(22, 500, exe="/opt/keep")).protected
    assert pss.reads == []
    # RSS not above the threshold: PSS (never above RSS) is not read
    assert verdict(pol, proc(24, 60)).rule == "default"
    assert pss.reads == []
    # unreadable (gone, not ours): no match, and explain says so
    v = verdict(pol, proc(26, 500))
    assert v.rule == "default" and v.pss_bytes is None and "pss unknown" in v.why


def test_pss_above_without_a_reader_never_holds():
    pol = make([{"pss_above": "1MiB", "action": "kill"}])
    assert verdict(pol, proc(21, 500)).rule == "default"


def test_pss_is_read_once_per_snapshot_for_kills_scores_and_the_kernel():
    pss = FakePss({21: 200, 22: 20})
    pol = make([{"pss_above": "100MiB", "action": "kill"}], pss=pss)
    snap = snapshot([proc(21, 300), proc(22, 300), proc(23, 10)], used_mib=960)
    plan = pol.decide(snap)
    pol.kernel_view(snap)
    assert sorted(pss.reads) == [21, 22]
    kills = [a for a in plan.actions if a.kind is ActionKind.KILL]
    assert kills[0].pid == 21 and "pss 200 MiB" in kills[0].reason


# --- tiers given to cgroups, and the in_tier condition ---------------------------------------

def test_cgroup_tiers_first_glob_in_file_order_wins_and_a_rule_tier_overrides():
    pol = make([{"name": "batch", "cgroup": "/lab/t/std/batch*", "action": "prefer", "tier": "free"}],
               tiers=["free", "standard", "premium"], default_tier="standard",
               cgroup_tiers={"/lab/t/vip/*": "premium", "/lab/t/*": "free", "/lab/t/std/*": "standard"})
    assert pol.cfg.warnings == ('policy.cgroup_tiers."/lab/t/std/*": never applies: policy.cgroup_tiers."/lab/t/*" '
                                "before it takes every cgroup it matches (the first glob wins); move it up or "
                                "remove it",)
    v = verdict(pol, proc(21, 100, memcg="/lab/t/vip/a"))
    assert (v.tier, v.tier_rank, v.tier_source, v.rule) == ("premium", 2, 'policy.cgroup_tiers."/lab/t/vip/*"',
                                                           "default")
    assert verdict(pol, proc(22, 100, memcg="/lab/t/std/a")).tier == "free", "the first glob that matches wins"
    v = verdict(pol, proc(23, 100, memcg="/lab/other"))
    assert (v.tier, v.tier_source) == ("standard", "policy.default_tier")
    v = verdict(pol, proc(24, 100, memcg="/lab/t/std/batch1"))
    assert (v.tier, v.tier_source, v.preferred) == ("free", 'rules[0] "batch"', True)
    # built-in protections keep the cgroup's tier (dbguard itself, a database server)
    assert verdict(pol, proc(SELF, 100, memcg="/lab/t/vip/g")).tier == "premium"
    v = verdict(pol, proc(25, 100, memcg="/lab/t/vip/pg"), Role.POSTMASTER)
    assert v.protected and v.tier == "premium"


def test_in_tier_tests_the_tier_before_any_rule_not_one_a_rule_gives():
    pol = make([{"name": "lift", "cgroup": "/lab/a*", "tier": "premium"},
                {"name": "premium", "in_tier": "premium", "action": "protect"},
                {"name": "low", "in_tier": ["free", "standard"], "exe": "/opt/*", "action": "prefer"}],
               tiers=["free", "standard", "premium"], cgroup_tiers={"/lab/p/*": "premium", "/lab/s/*": "standard"})
    v = verdict(pol, proc(21, 100, memcg="/lab/a"))
    assert v.rule_index == 0 and v.candidate and v.tier == "premium", "first match: rule 0 decides"
    v = verdict(pol, proc(22, 100, memcg="/lab/p/x"))
    assert v.rule_index == 1 and v.protected and v.tier == "premium" and "in_tier premium" in v.why
    assert verdict(pol, proc(23, 100, memcg="/lab/s/x", exe="/opt/y")).rule_index == 2
    assert verdict(pol, proc(24, 100, memcg="/lab/x", exe="/opt/y")).rule_index == 2      # default tier: free
    assert verdict(pol, proc(25, 100, memcg="/lab/p/y", exe="/opt/y")).rule_index == 1


def test_multi_tenant_example_with_cgroup_tiers_free_first_then_standard_never_premium():
    """The issue's example written as cgroup_tiers plus one protect rule on the tier."""
    pol = make([{"name": "premium", "in_tier": "premium", "action": "protect"}],
               tiers=["free", "standard", "premium"], default_tier="free",
               cgroup_tiers={"/lab/premium/*": "premium", "/lab/standard/*": "standard", "/lab/free/*": "free"})
    assert not pol.cfg.warnings
    procs = [proc(21, 300, memcg="/lab/standard/a"), proc(22, 60, memcg="/lab/free/a"),
             proc(23, 500, memcg="/lab/premium/a"), proc(24, 40, memcg="/lab/free/b"),
             proc(25, 90, memcg="/lab/premium/pg", exe="/usr/lib/postgresql/15/bin/postgres")]
    snap = snapshot(procs, roles={25: Role.POSTMASTER}, used_mib=960)
    assert [p.pid for p in pol.candidates(snap)] == [22, 24, 21]
    view = pol.kernel_view(snap)
    assert view.candidates == {22: 0, 24: 0}, "the kernel is told about the free tier only"
    assert view.protected == {23: (False, 2), 25: (True, 2)}, "per-process tier ranks from cgroup_tiers"
    kills = [a for a in pol.decide(snap).actions if a.kind is ActionKind.KILL]
    assert [a.pid for a in kills] == [22, 24, 21] and "tier free" in kills[0].reason
    assert all(a.pid != 23 for a in kills)
    # the free tier gone: the kernel is told about the standard tier
    assert pol.kernel_view(snapshot([procs[0], procs[2]])).candidates == {21: 1}


def test_a_tier_without_condition_next_to_cgroup_tiers_is_warned_as_probably_in_tier():
    cfg = config.from_dict({"policy": {"tiers": ["free", "premium"], "cgroup_tiers": {"/t/p/*": "premium"},
                                       "rules": [{"tier": "premium", "action": "protect"}]}})
    assert len(cfg.warnings) == 1 and 'write in_tier = "premium"' in cfg.warnings[0]
    assert cfg.warnings[0].startswith("policy.rules[0]: has no condition")
    cfg = config.from_dict({"policy": {"tiers": ["free", "premium"],
                                       "rules": [{"tier": "premium", "action": "protect"}]}})
    assert not cfg.warnings, "without cgroup_tiers there is no tier to confuse it with"


def test_explain_shows_pss_where_a_rule_needed_it_and_where_the_tier_came_from(monkeypatch, tmp_path, capsys):
    import json

    import dbguard.explain
    f = tmp_path / "c.toml"
    f.write_text('[kill]\nprotect_exe = []\n[policy]\ntiers = ["free", "premium"]\n'
                 '[policy.cgroup_tiers]\n"/lab/p/*" = "premium"\n'
                 '[[policy.rules]]\nname = "shared"\npss_above = "100MiB"\naction = "kill"\n')
    pss = FakePss({21: 40, 22: 150})

    def explain(cfg):
        pol = Driven(Policy(cfg, watched_memcg=CG, pss_reader=pss))
        snap = snapshot([proc(21, 200, comm="sharer"), proc(22, 200, memcg="/lab/p/x", comm="hog"),
                         proc(23, 90, comm="small")])
        return [{"snapshot": snap, "plan": pol.decide(snap), "policy": pol, "cgroup": "/sys/fs/cgroup/memory/lab"}]
    monkeypatch.setattr(dbguard.explain, "explain", explain)
    assert cli_main(["explain", "-c", str(f)]) == 0
    out = capsys.readouterr().out
    assert "rss 200 MiB, pss 40 MiB in the watched cgroup" in out
    assert 'rules[0] "shared": pss > 100MiB -> kill; rss 200 MiB, pss 150 MiB' in out
    assert sorted(pss.reads) == [21, 22], "read once for the plan and the listing (23 is too small to match)"
    assert cli_main(["explain", "-c", str(f), "--pid", "22"]) == 0
    out = capsys.readouterr().out
    assert "rss 200 MiB, pss 150 MiB" in out and "tier premium from policy.cgroup_tiers.\"/lab/p/*\"" in out
    assert cli_main(["explain", "-c", str(f), "--json"]) == 0
    rows = {r["pid"]: r for r in json.loads(capsys.readouterr().out)["processes"]}
    assert rows[21]["pss_bytes"] == 40 * MiB and rows[23]["pss_bytes"] is None
    assert rows[22]["tier_source"] == 'policy.cgroup_tiers."/lab/p/*"' and rows[21]["tier_source"] == \
        "policy.default_tier"


# --- kill order ------------------------------------------------------------------------------

TENANTS = [
    {"name": "free", "cgroup": "/lab/free/*", "tier": "free"},
    {"name": "standard", "cgroup": "/lab/standard/*", "tier": "standard"},
    {"name": "premium", "cgroup": "/lab/premium/*", "action": "protect", "tier": "premium"},
]


def test_kill_order_tier_then_weight_then_size_with_kill_rules_first():
    pol = make([{"name": "runaway", "rss_above": "400MiB", "action": "kill"},
                {"name": "batch", "cgroup": "/lab/free/batch*", "action": "prefer", "weight": 5, "tier": "free"},
                {"name": "etl", "cgroup": "/lab/standard/etl*", "action": "prefer", "weight": 9,
                 "tier": "standard"}, *TENANTS],
               tiers=["free", "standard", "premium"], default_tier="standard")
    procs = [proc(21, 100, memcg="/lab/free/a"), proc(2, 50, memcg="/lab/free/batch1"),
             proc(3, 300, memcg="/lab/standard/x"), proc(4, 300, memcg="/lab/premium/x"),
             proc(5, 200, memcg="/lab/free/b"), proc(6, 40, memcg="/lab/standard/etl1"),
             proc(7, 600, memcg="/lab/other"), proc(8, 999, memcg="/lab/premium/y")]
    order = [p.pid for p in pol.candidates(snapshot(procs))]
    # 8 and 7 match the kill rule: first, whatever their tier (for 8, the kill rule comes
    # before the premium protect rule: first match wins); then free (weight 5 first), then
    # standard (weight 9 first); premium 4 is protected.
    assert order == [8, 7, 2, 5, 21, 6, 3]
    assert 4 not in order


def test_kill_rule_matches_all_die_once_kills_are_allowed_others_only_to_the_goal():
    pol = make([{"rss_above": "100MiB", "action": "kill"}])
    procs = [proc(21, 150), proc(2, 120), proc(3, 80), proc(4, 60)]
    plan = pol.decide(snapshot(procs, used_mib=960))   # high level: 960 >= 90%; goal 85%: 110 MiB over
    killed = [a.pid for a in plan.actions if a.kind is ActionKind.KILL]
    assert plan.level >= Level.HIGH
    assert killed == [21, 2], "both kill-rule matches, though the first alone covered the excess"
    assert all("kill rule match" in a.reason for a in plan.actions if a.kind is ActionKind.KILL)


def test_kills_follow_tiers():
    pol = make(TENANTS, tiers=["free", "standard", "premium"])
    procs = [proc(21, 300, memcg="/lab/standard/a"), proc(2, 60, memcg="/lab/free/a"),
             proc(3, 500, memcg="/lab/premium/a")]
    plan = pol.decide(snapshot(procs, used_mib=960))
    kills = [a for a in plan.actions if a.kind is ActionKind.KILL]
    assert [a.pid for a in kills] == [2, 21], "free first although smaller; then standard; premium never"
    assert "tier free" in kills[0].reason and "tier standard" in kills[1].reason


# --- the kernel's share ----------------------------------------------------------------------

def test_kernel_view_lists_the_first_band_and_every_kill_match():
    pol = make([{"rss_above": "700MiB", "action": "kill"}, *TENANTS], tiers=["free", "standard", "premium"])
    procs = [proc(21, 300, memcg="/lab/standard/a"), proc(2, 60, memcg="/lab/free/a"),
             proc(3, 100, memcg="/lab/free/b"), proc(4, 500, memcg="/lab/premium/a"),
             proc(5, 800, memcg="/lab/standard/big"), proc(6, 90, exe="/usr/lib/postgresql/15/bin/postgres"),
             proc(7, 40, exe="/usr/lib/postgresql/15/bin/postgres")]
    view = pol.kernel_view(snapshot(procs, roles={6: Role.POSTMASTER, 7: Role.PG_BACKEND}))
    assert view.candidates == {5: 0, 2: 0, 3: 0}, "5: kill rule, default tier (free)"
    assert view.protected == {4: (False, 2), 6: (True, 0), 7: (False, 0)}
    # the free tier gone: the kernel is told about the standard tier
    view = pol.kernel_view(snapshot([procs[0], procs[3]]))
    assert view.candidates == {21: 1}


def test_kernel_view_default_policy_is_every_candidate():
    pol = make([])
    procs = [proc(21, 300), proc(2, 60), proc(3, 10)]
    assert pol.kernel_view(snapshot(procs)).candidates == {21: 0, 2: 0}


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, error", [
    ({"rules": [{"exe": "/x", "bogus": 1}]}, r"^policy.rules\[0\].bogus: unknown key"),
    ({"rules": [{"tier": "gold"}]}, r"^policy.rules\[0\].tier: unknown tier 'gold'; policy.tiers has default$"),
    ({"rules": [{"role": "postgres"}]}, r"^policy.rules\[0\].role: unknown role 'postgres'; roles are"),
    ({"rules": [{"cgroup": "/a/[b"}]}, r"^policy.rules\[0\].cgroup: bad glob '/a/\[b'"),
    ({"rules": [{"exe": ""}]}, r"^policy.rules\[0\].exe: empty pattern"),
    ({"rules": [{"action": "nuke"}]}, r"^policy.rules\[0\].action: must be one of protect, prefer, kill"),
    ({"rules": [{"action": "kill", "weight": 3}]}, r"^policy.rules\[0\].weight: only a prefer rule"),
    ({"rules": [{"action": "prefer", "weight": 0}]}, r"^policy.rules\[0\].weight: must be between 1 and 1000"),
    ({"rules": [{"rss_above": "3x memory"}]}, r"^policy.rules\[0\].rss_above: unknown threshold 'memory'"),
    ({"rules": [{"rss_above": "big"}]}, r"^policy.rules\[0\].rss_above: expected a size"),
    ({"rules": [{"rss_above": True}]}, r"^policy.rules\[0\].rss_above: expected a size"),
    ({"rules": [{"user": ""}]}, r"^policy.rules\[0\].user: empty user name"),
    ({"rules": [{"name": "a", "exe": "/x"}, {"name": "a", "exe": "/y"}]}, r"^policy.rules\[1\].name: 'a' is also"),
    ({"rules": {"exe": "/x"}}, r"^policy.rules: expected \[\[policy.rules\]\] tables"),
    ({"rules": ["x"]}, r"^policy.rules\[0\]: expected a table"),
    ({"tiers": []}, r"^policy.tiers: give at least one tier"),
    ({"tiers": ["a", "a"]}, r"^policy.tiers: 'a' is listed twice"),
    ({"tiers": ["a b"]}, r"^policy.tiers: 'a b' is not a tier name"),
    ({"tiers": ["a"], "default_tier": "b"}, r"^policy.default_tier: unknown tier 'b'"),
    ({"rule": []}, r"^policy.rule: unknown key \(did you mean rules\?\)"),
    ({"rules": [{"pss_above": "3x memory"}]}, r"^policy.rules\[0\].pss_above: unknown threshold 'memory'"),
    ({"rules": [{"pss_above": "big"}]}, r"^policy.rules\[0\].pss_above: expected a size"),
    ({"rules": [{"pss_above": [1]}]}, r"^policy.rules\[0\].pss_above: expected a size"),
    ({"rules": [{"pss_abov": "1GiB"}]}, r"^policy.rules\[0\].pss_abov: unknown key \(did you mean pss_above\?\)"),
    ({"rules": [{"in_tier": "gold"}]}, r"^policy.rules\[0\].in_tier: unknown tier 'gold'; policy.tiers has default$"),
    ({"rules": [{"in_tier": 3}]}, r"^policy.rules\[0\].in_tier: expected a list of strings"),
    ({"cgroup_tiers": {"/a/*": "gold"}},
     r'^policy.cgroup_tiers."/a/\*": unknown tier \'gold\'; policy.tiers has default$'),
    ({"cgroup_tiers": {"/a/[b": "default"}}, r'^policy.cgroup_tiers."/a/\[b": bad glob'),
    ({"cgroup_tiers": {"": "default"}}, r'^policy.cgroup_tiers."": empty pattern'),
    ({"cgroup_tiers": {"/a": 3}}, r'^policy.cgroup_tiers."/a": expected a tier name, got 3$'),
    ({"cgroup_tiers": {"a": ["x"]}}, r"^policy.cgroup_tiers.a: expected a tier name"),
    ({"cgroup_tiers": ["/a"]}, r"^policy.cgroup_tiers: expected a table"),
    ({"cgroup_tier": {}}, r"^policy.cgroup_tier: unknown key \(did you mean cgroup_tiers\?\)"),
])
def test_bad_policies_are_one_line_errors_naming_the_key(policy, error):
    with pytest.raises(ConfigError, match=error) as e:
        config.from_dict({"policy": policy})
    assert "\n" not in str(e.value)


toml_values = st.one_of(st.booleans(), st.integers(-10, 10**10), st.text(max_size=8),
                        st.sampled_from(["free", "2GiB", "2x kill.min_rss", "0.5x limit", "/a/*", "[", ""]),
                        st.lists(st.sampled_from(["free", "premium", "gold", "", "/a/[b", "*"]), max_size=3),
                        st.dictionaries(st.sampled_from(["/a/*", "*", "/a/[b", "", "x"]),
                                        st.one_of(st.sampled_from(["free", "premium", "gold"]), st.integers()),
                                        max_size=3))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["cgroup_tiers", "default_tier", "tiers"]), toml_values,
       st.sampled_from(["pss_above", "rss_above", "in_tier", "tier", "cgroup", "action", "pss_abov"]), toml_values)
def test_new_policy_keys_either_load_or_fail_with_one_line_naming_the_key(key, value, rule_key, rule_value):
    data = {"policy": {"tiers": ["free", "premium"], key: value, "rules": [{rule_key: rule_value}]}}
    try:
        config.from_dict(data)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        assert msg.startswith((f"policy.{key}", f"policy.rules[0].{rule_key}", "policy.rules[0]:")), msg


def test_globs_and_thresholds_parse():
    assert compile_glob("/x[[]y", "p").match("/x[y")
    assert compile_glob("/x[]]", "p").match("/x]")
    assert compile_glob("/x[!ab]", "p").match("/xc")
    assert parse_threshold("1.5x kill.min_rss", "p").resolve({"kill.min_rss": 100}) == 150
    assert parse_threshold("2GiB", "p").size == 2 * 1024**3
    assert parse_threshold("1048576", "p").size == 1048576


@pytest.mark.parametrize("rules, shadowed", [
    ([{"action": "kill"}, {"exe": "/x"}], [1]),                                     # catch-all first
    ([{"cgroup": "*", "tier": "default"}, {"exe": "/x"}], [1]),                     # "*" holds for all
    ([{"exe": ["/a", "/b"]}, {"exe": "/a", "rss_above": "1GiB"}], [1]),            # narrower, later
    ([{"rss_above": "1GiB"}, {"rss_above": "2GiB"}], [1]),
    ([{"rss_above": "2GiB"}, {"rss_above": "1GiB"}], []),
    ([{"exe": "/a"}, {"exe": ["/a", "/b"]}], []),
    ([{"exe": "/a"}, {"cgroup": "/a"}], []),
    ([{"exe": "/a"}, {"action": "kill"}, {"exe": "/b"}, {"exe": "/c"}], [2, 3]),
    ([{"pss_above": "1GiB"}, {"pss_above": "2GiB", "exe": "/x"}], [1]),
    ([{"pss_above": "2GiB"}, {"pss_above": "1GiB"}], []),
    ([{"pss_above": "1GiB", "action": "kill"}, {"exe": "/x"}], []),            # not a catch-all
    ([{"pss_above": "1GiB"}, {"rss_above": "2GiB"}], []),                       # checked conservatively
    ([{"rss_above": "1GiB"}, {"pss_above": "2GiB"}], []),
    ([{"in_tier": "a", "action": "protect"}, {"exe": "/x"}], []),               # not a catch-all
    ([{"in_tier": ["a", "b"]}, {"in_tier": "a", "exe": "/x"}], [1]),
    ([{"in_tier": "a"}, {"in_tier": ["a", "b"]}], []),
    ([{"in_tier": ["b", "default", "a"]}, {"exe": "/x"}], [1]),                 # every tier: no condition
])
def test_rules_that_can_never_match_are_warned(rules, shadowed):
    cfg = config.from_dict({"policy": {"rules": rules, "tiers": ["default", "a", "b"]}})
    got = [int(w.split("[")[1].split("]")[0]) for w in cfg.warnings]
    assert got == shadowed, cfg.warnings
    assert all("can never match" in w for w in cfg.warnings)


@pytest.mark.parametrize("cgroup_tiers, never", [
    ({"/t/*": "a", "/t/free/*": "b"}, ["/t/free/*"]),
    ({"/t/free/*": "b", "/t/*": "a"}, []),
    ({"*": "a", "/x": "b", "/y/*": "c"}, ["/x", "/y/*"]),
    ({"/t/[ab]*": "a", "/t/a/*": "b"}, []),           # conservative: no claim about sets
    ({"/t*": "a", "/t/x?": "b"}, ["/t/x?"]),
])
def test_cgroup_tiers_a_glob_that_never_applies_is_warned(cgroup_tiers, never):
    cfg = config.from_dict({"policy": {"tiers": ["a", "b", "c"], "cgroup_tiers": cgroup_tiers}})
    assert [w.split('"')[1] for w in cfg.warnings] == never
    assert all("never applies" in w for w in cfg.warnings)


def test_cgroup_tiers_keep_file_order_from_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[policy]\ntiers = ["a", "b"]\n[policy.cgroup_tiers]\n"/z/*" = "b"\n"/a/*" = "a"\n"/m" = "b"\n')
    assert config.load(f).policy.cgroup_tiers == (("/z/*", "b"), ("/a/*", "a"), ("/m", "b"))


def test_check_config_prints_the_warning_and_passes(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text('[[policy.rules]]\naction = "default"\n[[policy.rules]]\nexe = "/x"\naction = "kill"\n')
    assert cli_main(["check-config", str(f)]) == 0
    out = capsys.readouterr()
    assert "1 policy rule(s)" not in out.out and "2 policy rule(s)" in out.out
    assert "warning: policy.rules[1]: can never match" in out.err


def test_example_config_policies_parse(tmp_path):
    """The commented-out examples in config.example.toml are valid once uncommented."""
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[2] / "config.example.toml").read_text()
    blocks = text.split("# --- example: ")[1:]
    assert len(blocks) >= 3
    for block in blocks:
        lines = block.split("# --- end")[0].splitlines()[1:]
        body = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines)
        f = tmp_path / "x.toml"
        f.write_text(body)
        cfg = config.load(f)
        assert cfg.policy.rules, block[:40]
        assert not cfg.warnings, cfg.warnings
    assert config.load(pathlib.Path(__file__).resolve().parents[2] / "config.example.toml").policy == \
        config.default().policy, "the examples stay commented out: the default is unchanged"


# --- first-match semantics on random rule lists (hypothesis) --------------------------------

MEMCGS = ["/lab", "/lab/a", "/lab/a/b", "/lab/batch.slice/j1", "/lab/free/t1", "/lab/premium/t2", "/other"]
EXES = ["/usr/bin/python3", "/usr/sbin/sshd", "/opt/job/run", "/opt/x", "/srv/a"]
GLOBS_CG = ["/lab/*", "/lab/a*", "/lab/a/*", "/lab/batch.slice/*", "/lab/*/t1", "*", "/lab/[ab]*", "/other"]
GLOBS_EXE = ["/usr/bin/*", "/opt/*", "/usr/sbin/ss?d", "*", "/srv/[!b]", "/opt/job/run"]
TIERS = ["free", "standard", "premium"]
SIZES = ["50MiB", "100MiB", "2x kill.min_rss", "0.2x limit"]


@st.composite
def rule(draw):
    r: dict = {}
    if draw(st.booleans()):
        r["cgroup"] = draw(st.lists(st.sampled_from(GLOBS_CG), min_size=1, max_size=2))
    if draw(st.booleans()):
        r["exe"] = draw(st.lists(st.sampled_from(GLOBS_EXE), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        r["user"] = draw(st.lists(st.sampled_from(["0", "1000", "alice"]), min_size=1, max_size=2))
    if draw(st.integers(0, 2)) == 0:
        r["rss_above"] = draw(st.sampled_from(SIZES))
    if draw(st.integers(0, 2)) == 0:
        r["pss_above"] = draw(st.sampled_from(SIZES))
    if draw(st.integers(0, 2)) == 0:
        r["in_tier"] = draw(st.lists(st.sampled_from(TIERS), min_size=1, max_size=3))
    r["action"] = draw(st.sampled_from(["protect", "prefer", "kill", "default"]))
    if r["action"] == "prefer" and draw(st.booleans()):
        r["weight"] = draw(st.integers(1, 9))
    if draw(st.booleans()):
        r["tier"] = draw(st.sampled_from(TIERS))
    if r["action"] == "protect" and draw(st.booleans()):
        r["role"] = draw(st.sampled_from(["other", "pg_backend"]))
    return r


procs_st = st.builds(
    lambda pid, rss, memcg, exe, uid: proc(pid, rss, memcg=memcg, exe=exe, uid=uid),
    st.integers(2, 400), st.integers(0, 300), st.sampled_from(MEMCGS), st.sampled_from(EXES),
    st.sampled_from([0, 1000, 1500]))
# PSS of a process: a share of its RSS (PSS never exceeds RSS), or unreadable (None)
pss_share_st = st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
cgroup_tiers_st = st.dictionaries(st.sampled_from(GLOBS_CG), st.sampled_from(TIERS), max_size=3)


def oracle(rules: list[dict], p: Proc, named: dict, base_tier: str, pss: int | None) -> tuple[int | None, bool]:
    """An independent reading of the documented semantics: the first rule all of whose
    conditions hold; a list holds when any item does. Also whether PSS had to be read: a
    pss_above rule was reached, every other condition of it held, and RSS was above it."""
    uids = {"alice": 1500}
    read = False

    def size(text: str) -> int:
        return {"50MiB": 50 * MiB, "100MiB": 100 * MiB, "2x kill.min_rss": 2 * named["kill.min_rss"],
                "0.2x limit": int(0.2 * named["limit"])}[text]
    for i, r in enumerate(rules):
        if "role" in r and r["role"] != "other":
            continue
        if "in_tier" in r and base_tier not in r["in_tier"]:
            continue
        if "cgroup" in r and not any(fnmatch.fnmatchcase(p.memcg, g) for g in r["cgroup"]):
            continue
        if "exe" in r and not any(fnmatch.fnmatchcase(p.exe, g) for g in r["exe"]):
            continue
        if "user" in r and p.uid not in {int(u) if u.isdigit() else uids[u] for u in r["user"]}:
            continue
        if "rss_above" in r and p.rss_bytes <= size(r["rss_above"]):
            continue
        if "pss_above" in r:
            if p.rss_bytes <= size(r["pss_above"]):
                continue
            read = True
            if pss is None or pss <= size(r["pss_above"]):
                continue
        return i, read
    return None, read


def tier_oracle(cgroup_tiers: dict[str, str], p: Proc) -> str:
    return next((t for g, t in cgroup_tiers.items() if fnmatch.fnmatchcase(p.memcg, g)), TIERS[0])


@settings(max_examples=300, deadline=None)
@given(st.lists(rule(), max_size=8), st.lists(procs_st, min_size=1, max_size=12, unique_by=lambda p: p.pid),
       st.data(), cgroup_tiers_st)
def test_first_match_semantics_hold_for_random_rule_lists(rules, procs, data, cgroup_tiers):
    shares = {p.pid: data.draw(pss_share_st) for p in procs}
    pss = FakePss({pid: p.rss_bytes * share / MiB for pid, p in ((p.pid, p) for p in procs)
                   if (share := shares[pid]) is not None})
    pol = make(rules, tiers=TIERS, uids={"alice": 1500}, pss=pss, cgroup_tiers=cgroup_tiers)
    snap = snapshot(procs)
    ranked = pol.ranked(snap)
    named = pol.thresholds()
    # PSS was read once for each process that reached a pss_above rule, and for no other
    reads, pss.reads = pss.reads, []
    assert sorted(reads) == sorted(set(reads)), "read at most once per process and snapshot"
    never = {w.split(":")[0] for w in pol.cfg.warnings if "never applies" in w}
    for p in procs:
        v = verdict(pol, p)
        base = tier_oracle(cgroup_tiers, p)
        want, read = oracle(rules, p, named, base, pss.bytes.get(p.pid))
        assert v.rule_index == want, (p, rules, v)
        assert (p.pid in reads) == read, (p, rules, reads)
        assert v.pss_bytes == (pss.bytes.get(p.pid) if read else None)
        if want is not None:
            r = rules[want]
            assert v.protected == (r["action"] == "protect")
            assert v.tier == r.get("tier", base)
            if v.candidate:
                assert v.action == r["action"]
        else:
            assert v.tier == base
        assert v.tier_rank == TIERS.index(v.tier)
        # a warned-about rule never decides anything; a warned-about cgroup_tiers glob never gives a tier
        for w in pol.cfg.warnings:
            if "can never match" in w:
                assert f"policy.rules[{v.rule_index}]:" not in w
        assert v.tier_source not in never
    # the kill order is sorted as documented, and the kernel is told only about its head
    keys = [(0 if v.action == "kill" else 1, v.tier_rank, -v.weight, -p.rss_bytes, p.pid) for p, v in ranked]
    assert keys == sorted(keys)
    view = pol.kernel_view(snap)
    for p, v in ranked:
        if v.action == "kill":
            assert view.candidates[p.pid] == v.tier_rank
    non_kill = [(p, v) for p, v in ranked if v.action != "kill"]
    if non_kill:
        head = non_kill[0][1].order
        assert {p.pid for p, v in non_kill if v.order == head} == set(view.candidates) - {
            p.pid for p, v in ranked if v.action == "kill"}
    assert not set(view.candidates) & set(view.protected)
    assert set(view.protected) == {p.pid for p in procs if verdict(pol, p).protected}


def test_ruleset_rank_and_default_tier():
    rs = RuleSet(config.from_dict({"policy": {"tiers": ["a", "b"], "default_tier": "b"}}).policy)
    assert rs.default_tier == "b" and rs.rank("") == 1 and rs.rank("a") == 0


def test_a_kill_under_way_holds_later_tiers_a_skipped_one_does_not():
    pol = make(TENANTS, tiers=["free", "standard", "premium"])
    procs = [proc(21, 300, memcg="/lab/standard/a"), proc(22, 60, memcg="/lab/free/a"),
             proc(23, 50, memcg="/lab/free/b")]
    kills = [a for a in pol.decide(snapshot(procs, used_mib=960)).actions if a.kind is ActionKind.KILL]
    assert [a.pid for a in kills] == [22, 23]
    # 22 and 23 still listed half a second later (dying), usage still high: the standard
    # tier waits for them rather than lose a process out of order
    later = [a for a in pol.decide(snapshot(procs, used_mib=990, ts=0.5)).actions if a.kind is ActionKind.KILL]
    assert later == []
    # the executor skipped them (pressure fell first): they are the next candidates again
    for a in kills:
        pol.kill_not_done(a)
    again = [a.pid for a in pol.decide(snapshot(procs, used_mib=990, ts=1.0)).actions if a.kind is ActionKind.KILL]
    assert again == [22, 23, 21], "free first; 140 MiB over, so the standard one too, after them"
