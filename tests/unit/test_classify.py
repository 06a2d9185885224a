"""dbguard.classify: roles by fact, on hand-built process tables and random ones (hypothesis)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from dbguard.classify import Classifier, classify
from dbguard.model import DbStats, Proc, Role


def proc(pid: int, ppid: int = 1, comm: str = "sh", kernel_thread: bool = False, exe: str = "/bin/sh") -> Proc:
    return Proc(pid=pid, start_time=100 + pid, ppid=ppid, uid=0, comm=comm, exe=exe, cmdline=comm,
                rss_bytes=1 << 20, memcg="/", oom_score_adj=0, kernel_thread=kernel_thread)


PG_EXE = "/usr/lib/postgresql/15/bin/postgres"


def table(*procs: Proc) -> dict[int, Proc]:
    return {p.pid: p for p in procs}


def pg(server_pid: int | None, roles: dict[int, Role] | None = None, up: bool = True) -> DbStats:
    return DbStats(name="main", kind="postgresql", up=up, server_pid=server_pid, roles=roles or {})


def roles_of(procs: dict[int, Proc], databases: list[DbStats], self_pid: int) -> dict[int, Role]:
    """classify()'s answer for every pid of `procs`: it keeps no entry for OTHER, the role of a
    pid it leaves out."""
    roles = classify(procs, databases, self_pid)
    assert roles.keys() <= procs.keys() and Role.OTHER not in roles.values(), roles
    return {pid: roles.get(pid, Role.OTHER) for pid in procs}


def test_fixed_roles_and_postgres_family():
    procs = table(
        proc(1, 0, "systemd"),
        proc(2, 0, "kthreadd", kernel_thread=True),
        proc(17, 2, "kworker/0:1", kernel_thread=True),
        proc(500, 1, "python3"),                         # dbguard
        proc(700, 1, "postgres", exe=PG_EXE),            # postmaster
        proc(701, 700, "postgres", exe=PG_EXE),          # checkpointer, SQL says auxiliary
        proc(702, 700, "postgres", exe=PG_EXE),          # client backend, SQL says so
        proc(703, 700, "postgres", exe=PG_EXE),          # forked a moment ago, not in pg_stat_activity yet
        proc(800, 702, "sh"),                            # grandchild (COPY ... PROGRAM): not a backend
        proc(801, 800, "gzip", exe="/usr/bin/gzip"),     # and its child: the database's work too
        proc(900, 1, "postgres", exe=PG_EXE),            # another server nobody configured
        proc(901, 900, "postgres", exe=PG_EXE),
        proc(902, 901, "sh"),                            # its archive_command
        proc(950, 1, "postgres", exe="/usr/local/bin/hog"),   # merely called postgres
    )
    roles = roles_of(procs, [pg(700, {701: Role.PG_AUXILIARY, 702: Role.PG_BACKEND})], self_pid=500)
    assert roles == {
        1: Role.INIT, 2: Role.KERNEL_THREAD, 17: Role.KERNEL_THREAD, 500: Role.DBGUARD,
        700: Role.POSTMASTER, 701: Role.PG_AUXILIARY, 702: Role.PG_BACKEND, 703: Role.PG_BACKEND,
        800: Role.DB_CHILD, 801: Role.DB_CHILD, 900: Role.DB_UNKNOWN, 901: Role.DB_UNKNOWN, 902: Role.DB_CHILD,
        950: Role.OTHER,
    }
    assert all(roles[p].never_signalled and not roles[p].is_database for p in (800, 801, 900, 901, 902))


def test_server_pid_not_running_protects_nobody():
    procs = table(proc(1, 0), proc(700, 1, "postgres"), proc(701, 700, "postgres"))
    # server_pid points at a pid that is gone (or reused elsewhere): nothing is the database's
    roles = roles_of(procs, [pg(650, {701: Role.PG_BACKEND})], self_pid=999)
    assert roles[700] == Role.OTHER and roles[701] == Role.OTHER


def test_unidentified_servers_and_their_children_are_never_other():
    """Fail safe: no database identified at all (login refused, no SQL), yet every process
    running a server executable, and everything below it, is shielded."""
    procs = table(proc(1, 0), proc(700, 1, "postgres", exe=PG_EXE), proc(701, 700, "postgres", exe=PG_EXE),
                  proc(702, 701, "sh"), proc(300, 1, "mariadbd", exe="/usr/sbin/mariadbd"),
                  proc(301, 1, "mysqld", exe="/usr/sbin/mysqld (deleted)".removesuffix(" (deleted)")),
                  proc(400, 1, "python3", exe="/usr/bin/python3"))
    roles = roles_of(procs, [pg(None, up=False)], self_pid=999)
    assert roles == {1: Role.INIT, 700: Role.DB_UNKNOWN, 701: Role.DB_UNKNOWN, 702: Role.DB_CHILD,
                     300: Role.DB_UNKNOWN, 301: Role.DB_UNKNOWN, 400: Role.OTHER}


def test_deep_family_and_a_loop_in_parentage():
    chain = [proc(700, 1, "postgres", exe=PG_EXE)] + [proc(710 + i, 709 + i if i else 700) for i in range(20)]
    looped = [proc(50, 51), proc(51, 50)]          # a torn read can show this; it must not hang
    roles = roles_of(table(proc(1, 0), *chain, *looped), [pg(700)], self_pid=999)
    assert roles[710] == Role.PG_BACKEND and all(roles[710 + i] == Role.DB_CHILD for i in range(1, 20))
    assert roles[50] == roles[51] == Role.OTHER


def test_sql_roles_outside_postmaster_children_are_ignored_for_postgresql():
    procs = table(proc(1, 0), proc(700, 1), proc(750, 1))
    roles = roles_of(procs, [pg(700, {750: Role.PG_BACKEND})], self_pid=999)
    assert roles[750] == Role.OTHER


def test_stale_stats_still_protect_by_server_pid():
    procs = table(proc(1, 0), proc(700, 1), proc(701, 700))
    roles = roles_of(procs, [pg(700, up=False)], self_pid=999)
    assert (roles[700], roles[701]) == (Role.POSTMASTER, Role.PG_BACKEND)


def test_mysql_server_and_reported_pids():
    procs = table(proc(1, 0), proc(300, 1, "mysqld_safe"), proc(301, 300, "mariadbd"), proc(302, 301, "sh"))
    db = DbStats(name="orders", kind="mysql", up=True, server_pid=301, roles={301: Role.MYSQLD, 4242: Role.MYSQLD})
    roles = roles_of(procs, [db], self_pid=999)
    # A child of mysqld is not a database process unless the server reported it, but it is
    # the database's family: never a candidate.
    assert roles == {1: Role.INIT, 300: Role.OTHER, 301: Role.MYSQLD, 302: Role.DB_CHILD}


def test_two_databases():
    procs = table(proc(1, 0), proc(700, 1), proc(701, 700), proc(301, 1, "mariadbd"))
    mysql = DbStats(name="orders", kind="mysql", up=True, server_pid=301)
    roles = roles_of(procs, [pg(700), mysql], self_pid=999)
    assert (roles[700], roles[701], roles[301]) == (Role.POSTMASTER, Role.PG_BACKEND, Role.MYSQLD)


def test_postmaster_as_pid_1_in_a_container():
    procs = table(proc(1, 0, "postgres"), proc(30, 1, "postgres"), proc(40, 0, "dbguard"))
    roles = roles_of(procs, [pg(1)], self_pid=40)
    assert roles == {1: Role.POSTMASTER, 30: Role.PG_BACKEND, 40: Role.DBGUARD}
    assert roles[1].never_signalled


def test_self_and_kernel_threads_win_over_database_claims():
    procs = table(proc(1, 0), proc(700, 1), proc(701, 700), proc(2, 0, kernel_thread=True))
    # Nonsense from SQL (or a pid that got reused) cannot turn dbguard or a kthread into a backend.
    roles = roles_of(procs, [pg(700, {701: Role.PG_BACKEND}), pg(2)], self_pid=701)
    assert roles[701] == Role.DBGUARD and roles[2] == Role.KERNEL_THREAD


# --- property test --------------------------------------------------------------------------

PIDS = st.integers(min_value=1, max_value=60)
DB_ROLES = st.sampled_from([Role.POSTMASTER, Role.PG_AUXILIARY, Role.PG_BACKEND, Role.MYSQLD, Role.OTHER])


@st.composite
def scenarios(draw):
    pids = draw(st.sets(PIDS, min_size=1, max_size=40))
    procs = {}
    for pid in pids:
        ppid = draw(st.one_of(st.sampled_from(sorted(pids | {0, 2})), PIDS))
        procs[pid] = proc(pid, ppid, kernel_thread=draw(st.booleans()) and draw(st.booleans()))
    dbs = draw(st.lists(st.builds(
        DbStats, name=st.just("db"), kind=st.sampled_from(["postgresql", "mysql"]), up=st.booleans(),
        server_pid=st.one_of(st.none(), PIDS),
        roles=st.dictionaries(PIDS, DB_ROLES, max_size=8)), max_size=3))
    self_pid = draw(st.one_of(st.sampled_from(sorted(pids)), PIDS))
    return procs, dbs, self_pid


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_property_roles(scenario):
    procs, dbs, self_pid = scenario
    roles = roles_of(procs, dbs, self_pid)                              # exactly one role each
    servers = {db.server_pid for db in dbs if db.server_pid in procs}
    mysql_reported = {pid for db in dbs if db.kind == "mysql" for pid in db.roles}
    for pid, role in roles.items():
        p = procs[pid]
        if p.kernel_thread:
            assert role == Role.KERNEL_THREAD
        elif pid == self_pid:
            assert role == Role.DBGUARD
        if pid == 1 or pid == self_pid or p.kernel_thread:
            assert role != Role.OTHER
        if role.is_database:
            assert pid in servers or p.ppid in servers or pid in mysql_reported, (pid, role)
        # Everything below a database process is shielded, however deep.
        q, seen = p, 0
        while q.ppid in procs and seen < len(procs) and not p.kernel_thread and pid not in (1, self_pid):
            q, seen = procs[q.ppid], seen + 1
            if roles[q.pid].is_database and q.pid != self_pid and not roles[pid].is_database:
                assert role is Role.DB_CHILD, (pid, q.pid)
                break
        # A child of a running postmaster is never left unshielded.
        pg_servers = {db.server_pid for db in dbs if db.kind == "postgresql" and db.server_pid in procs}
        if p.ppid in pg_servers and not p.kernel_thread and pid != self_pid:
            assert role.is_database


# --- kept across cycles: Classifier against classify() --------------------------------------

SERVER_EXES = ["/bin/sh", "/bin/sh", PG_EXE, "/usr/sbin/mariadbd"]


@st.composite
def histories(draw):
    """A table changing over a few cycles: forks, exits (children keep the dead parent's pid
    until read again), execs, re-reads with only memory changed, re-parenting; the databases'
    reports change too."""
    procs = {p.pid: p for p in draw(scenarios())[0].values()}
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        procs = dict(procs)
        for _ in range(draw(st.integers(0, 6))):
            op = draw(st.sampled_from(["fork", "exit", "exec", "reread", "reparent"]))
            pid = draw(PIDS)
            if op == "fork" and pid not in procs:
                parent = draw(st.sampled_from(sorted(procs))) if procs else 1
                procs[pid] = proc(pid, parent, exe=draw(st.sampled_from(SERVER_EXES)))
            elif op == "exit":
                procs.pop(pid, None)
            elif pid in procs:
                p = procs[pid]
                exe = draw(st.sampled_from(SERVER_EXES)) if op == "exec" else p.exe
                ppid = draw(st.one_of(PIDS, st.just(1))) if op == "reparent" else p.ppid
                procs[pid] = Proc(pid=pid, start_time=p.start_time, ppid=ppid, uid=0, comm=p.comm, exe=exe,
                                  cmdline=p.cmdline, rss_bytes=p.rss_bytes + 4096, memcg="/", oom_score_adj=0,
                                  kernel_thread=p.kernel_thread)
        dbs = draw(st.lists(st.builds(
            DbStats, name=st.just("db"), kind=st.sampled_from(["postgresql", "mysql"]), up=st.booleans(),
            server_pid=st.one_of(st.none(), PIDS),
            roles=st.dictionaries(PIDS, DB_ROLES, max_size=8)), max_size=2))
        steps.append((procs, dbs))
    return steps, draw(PIDS)


@settings(max_examples=400, deadline=None)
@given(histories())
def test_classifier_kept_across_cycles_answers_as_classify(history):
    steps, self_pid = history
    c = Classifier()
    before: dict = {}
    last_roles: dict = {}
    for procs, dbs in steps:
        changed = {pid for pid in before.keys() | procs.keys() if before.get(pid) is not procs.get(pid)}
        roles = c.update(procs, dbs, self_pid, changed=changed)
        assert roles == classify(procs, dbs, self_pid)
        moved = {pid for pid in roles.keys() | last_roles.keys() if roles.get(pid) != last_roles.get(pid)}
        assert moved <= c.changed
        before, last_roles = procs, roles
