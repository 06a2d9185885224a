"""The memcached adapter against real memcached servers the suite starts (lab.memcached): the
limit down to the floor in steps and back exactly, read from memcached's own stats; the slab
memory it held handed back to the kernel at each step (its RSS, read in /proc, falls with it);
evictions take over once it is lowered; -M and no_slab_reassign left alone and said so; down
is one line; the originals a killed dbguard left are found by the next one."""
from __future__ import annotations

import pytest

from dbguard import config
from dbguard.caches.memcached import Memcached as Adapter
from dbguard.model import Status
from lab.memcached import MiB, Memcached
from lab.procs import rss

pytestmark = [pytest.mark.db, pytest.mark.root]


def adapter(m: Memcached, tmp_path, floor: int = 32 * MiB) -> Adapter:
    cfg = config.from_dict({"caches": [{"kind": "memcached", "name": "mc", "url": m.socket, "floor": floor}]})
    return Adapter(cfg.caches[0], str(tmp_path / "state"))


def test_limit_down_in_steps_and_back_exactly(memcached_host, tmp_path):
    with Memcached(limit_mib=128) as m:
        m.fill(100 * MiB)
        a = adapter(m, tmp_path)
        s = a.collect()
        assert s.up and s.server_pid == m.pid and (s.limit, s.shrink_steps_max) == (128 * MiB, 3)
        held, resident = m.stats("slabs")["total_malloced"], rss(m.pid)
        assert held >= 100 * MiB and resident >= held, (held, resident)
        seen = []
        for step in (1, 2, 3):
            out = a.set_shrink_step(step)
            assert out.status is Status.DONE, out.detail
            seen.append((m.stats()["limit_maxbytes"], m.stats("slabs")["total_malloced"]))
            assert "slab page(s) handed back" in out.detail, out.detail
        assert [limit for limit, _ in seen] == [96 * MiB, 64 * MiB, 32 * MiB]   # 128 -> 32 MiB in 3 equal steps
        assert all(h <= limit for limit, h in seen), seen                    # held no more than the limit
        # the kernel's count: what memcached freed left its RSS (not just its own books)
        assert rss(m.pid) <= resident - (held - 32 * MiB) * 0.9, (resident // MiB, rss(m.pid) // MiB)
        before = m.stats()["evictions"]
        m.fill(40 * MiB, prefix="new")                                       # new sets now evict instead of growing
        assert m.stats()["evictions"] > before
        fresh = adapter(m, tmp_path)                             # a new dbguard (the old one killed)
        assert (fresh.collect().configured, fresh.collect().shrink_step) == (128 * MiB, 3)
        for step in (2, 1, 0):
            assert fresh.set_shrink_step(step).status is Status.DONE
        assert m.stats()["limit_maxbytes"] == 128 * MiB
        assert not (tmp_path / "state" / "originals-cache-mc.json").exists()


def test_no_evictions_is_left_alone_and_down_is_one_line(memcached_host, tmp_path):
    with Memcached(limit_mib=64, evictions=False) as m:
        a = adapter(m, tmp_path, floor=16 * MiB)
        s = a.collect()
        assert "-M" in s.why_not and s.exhausted
        assert a.set_shrink_step(1).status is Status.REFUSED
        assert m.stats()["limit_maxbytes"] == 64 * MiB
    s = adapter(m, tmp_path).collect()
    assert not s.up and "cannot reach the server" in s.error and "\n" not in s.error


def test_without_slab_reassign_it_cannot_give_back_and_is_left_alone(memcached_host, tmp_path):
    with Memcached(limit_mib=64, options=("no_slab_reassign",)) as m:
        a = adapter(m, tmp_path, floor=16 * MiB)
        s = a.collect()
        assert "slab_reassign" in s.why_not and s.exhausted         # so no shield for memory it cannot give
        out = a.set_shrink_step(1)
        assert out.status is Status.REFUSED and "slab_reassign" in out.detail
        assert m.stats()["limit_maxbytes"] == 64 * MiB
