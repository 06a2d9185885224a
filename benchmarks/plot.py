"""Timeline PNGs: one scenario, one panel per contender (its first run).

Memory use of the cgroup, host memory PSI (some avg10), pgbench tps (MariaDB: queries/s and
the buffer pool's size), and a red line at each kill or ended query: people would rather look
than read.
"""
from __future__ import annotations

from pathlib import Path

from .tables import ORDER, PRESSURE_SCENARIOS


def _first_runs(data: dict, scenario: str) -> list[dict]:
    firsts: dict[str, dict] = {}
    for r in data.get("runs", []):
        if r.get("scenario") == scenario and not r.get("error") and r.get("samples"):
            firsts.setdefault(r["contender"], r)
    return [firsts[c] for c in ORDER if c in firsts] + [r for c, r in firsts.items() if c not in ORDER]


def _restart_times(run: dict) -> list[float]:
    return [t for t, what in run.get("timeline", []) if what.startswith("mariadbd restarted")]


def _kill_times(run: dict) -> list[float]:
    out = []
    for t, what in run.get("timeline", []):
        if ("died" in what or "OOM kill" in what or "runaway query ended" in what) and "exited after" not in what:
            out.append(t)
    return out


def timeline(data: dict, scenario: str, path: Path) -> bool:
    runs = _first_runs(data, scenario)
    if not runs:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tps_max = max((tps for r in runs for _, tps in r.get("tps_progress", [])), default=1) * 1.1
    rate = "queries/s" if any("pool_samples" in r for r in runs) else "pgbench tps"
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.3 * len(runs) + 0.6), sharex=True, squeeze=False)
    first_row = None
    for ax, run in zip(axes[:, 0], runs):
        s = run["samples"]
        t = [x["t"] for x in s]
        ax.plot(t, [x["usage_mib"] for x in s], color="tab:blue", lw=1.2, label="cgroup memory (MiB)")
        if run.get("pool_samples"):
            ax.step([x[0] for x in run["pool_samples"]], [x[1] for x in run["pool_samples"]], where="post",
                    color="tab:purple", lw=1.0, label="buffer pool size (MiB)")
        ax.set_ylabel("MiB", color="tab:blue")
        ax.set_ylim(0, max(1100, max((x["usage_mib"] for x in s), default=0) * 1.1))
        ax2 = ax.twinx()
        prog = run.get("tps_progress", [])
        ax2.plot([p[0] for p in prog], [p[1] for p in prog], color="tab:green", lw=1.0, label=rate)
        ax2.set_ylabel(rate.split()[-1], color="tab:green")
        ax2.set_ylim(0, tps_max)          # one scale for all panels: compare by eye
        ax3 = ax.twinx()
        ax3.spines["right"].set_position(("outward", 48))
        ax3.plot(t, [x["psi_some"] for x in s], color="tab:orange", lw=0.9, ls="--", label="PSI some avg10 (%)")
        ax3.set_ylim(0, 100)
        ax3.set_ylabel("PSI %", color="tab:orange")
        for k in _kill_times(run):
            ax.axvline(k, color="red", lw=0.8, alpha=0.7)
        for k in _restart_times(run):
            ax.axvline(k, color="tab:green", lw=0.9, ls="--", alpha=0.8)
        verdict = ("database survived" if run.get("db_survived") else "database DOWN") + \
            f", {run.get('crash_recoveries', 0)} crash recoveries, {run.get('sessions_lost', 0)} sessions lost" + \
            (f", {run['db_restarts']} restarts" if run.get("db_restarts") else "")
        ax.set_title(f"{run['contender']}: {verdict}", fontsize=9, loc="left")
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        first_row = first_row or (ax, ax2, ax3)
    axes[-1, 0].set_xlabel("seconds since the load started")
    handles = []
    for a in first_row:
        handles += a.get_legend_handles_labels()[0]
    fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=3)
    fig.suptitle(f"{scenario}: timeline per contender (red: a kill or an ended query)", fontsize=10, x=0.01,
                 ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def scale_curve(data: dict, path: Path) -> bool:
    """Processes on the host vs one cycle's CPU time: at rest, under pressure, and the full
    read every cycle once cost."""
    curve = (data.get("scale") or {}).get("curve") or []
    if not curve:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [c["processes"] for c in curve]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for key, label, color in (("full_cpu_ms", "full read of /proc + classify (every cycle, before)", "tab:red"),
                              ("pressed_cpu_ms", "cycle under pressure (scope read afresh)", "tab:orange"),
                              ("rest_cpu_ms", "daemon cycle at rest", "tab:green")):
        ax.plot(x, [c[key] for c in curve], marker="o", color=color, label=label)
    for e in ((data.get("earlier") or {}).get("scale") or [])[:1]:
        before = e["data"].get("curve") or []
        git = (e.get("provenance") or {}).get("git", "?")
        for key, label, color in (("pressed_cpu_ms", f"under pressure, before (git {git})", "tab:orange"),
                                  ("rest_cpu_ms", f"at rest, before (git {git})", "tab:green")):
            ax.plot([c["processes"] for c in before], [c[key] for c in before], linestyle="--", marker="x",
                    color=color, alpha=0.6, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("processes on the host")
    ax.set_ylabel("CPU per cycle (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_all(data: dict, out_dir: Path) -> dict[str, str]:
    """scenario -> file name of its PNG, for those that could be drawn."""
    done = {}
    if scale_curve(data, out_dir / "scale-curve.png"):
        done["scale"] = "scale-curve.png"
    for s in PRESSURE_SCENARIOS:
        name = f"timeline-{s}.png"
        if timeline(data, s, out_dir / name):
            done[s] = name
    return done
