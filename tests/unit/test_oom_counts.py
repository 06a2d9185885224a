"""sense/events.py: the kernel's OOM counts as each kind of file shows them (captured from
Linux 6.1 in the test VM and 6.18 here), and the one line a rise becomes."""
from dbguard.sense.events import OomCounts, parse_oom_counts, rise, rise_record

V2_EVENTS = "low 0\nhigh 0\nmax 2119\noom 3\noom_kill 2\noom_group_kill 0\n"
V1_OOM_CONTROL = "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n"
VMSTAT = "nr_free_pages 5714811\npgfault 1029\noom_kill 7\nnr_unstable 0\n"


def test_each_file_gives_its_counts():
    assert parse_oom_counts(V2_EVENTS, "/sys/fs/cgroup/a/memory.events") == \
        OomCounts("/sys/fs/cgroup/a/memory.events", kills=2, ooms=3)
    assert parse_oom_counts(V1_OOM_CONTROL, "x/memory.oom_control").ooms is None
    assert parse_oom_counts(V1_OOM_CONTROL, "x/memory.oom_control").kills == 4
    assert parse_oom_counts(VMSTAT, "/proc/vmstat") == OomCounts("/proc/vmstat", kills=7, ooms=None)
    assert parse_oom_counts("oom_kill_disable 0\nunder_oom 0\n", "old/memory.oom_control") is None


def test_only_a_rise_is_a_line():
    a = OomCounts("/sys/fs/cgroup/a/memory.events", kills=2, ooms=3)
    b = OomCounts("/sys/fs/cgroup/a/memory.events", kills=4, ooms=5)
    assert rise(a, b) == "memory.events oom_kill 2 -> 4, oom 3 -> 5"
    assert rise(a, a) is None and rise(b, a) is None
    assert rise(None, b) is None and rise(a, None) is None
    v1 = OomCounts("x/memory.oom_control", kills=1, ooms=None)
    assert rise(v1, OomCounts("x/memory.oom_control", kills=2, ooms=None)) == "memory.oom_control oom_kill 1 -> 2"


def test_a_rise_is_one_kernel_record_with_the_counts():
    a = OomCounts("/sys/fs/cgroup/a/memory.events", kills=2, ooms=3)
    b = OomCounts("/sys/fs/cgroup/a/memory.events", kills=4, ooms=5)
    rec = rise_record("/sys/fs/cgroup/a", a, b, "high")
    assert rec["action"] == "kernel_oom_count" and rec["path"] == "kernel" and rec["target"] == "/sys/fs/cgroup/a"
    assert (rec["oom_kill"], rec["oom"], rec["level"]) == (4, 5, "high")
    assert rec["result"] == "2 kernel OOM kill(s) in the watched scope"
    assert rise_record("", a, a, "ok") is None
    assert rise_record("", OomCounts("/proc/vmstat", 1, None), OomCounts("/proc/vmstat", 2, None), "ok")["target"] == "host"
