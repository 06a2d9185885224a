"""What dbguard's resident memory is made of (issue #17): the running daemon's RSS by mapping
(/proc/PID/smaps, grouped; benchmarks.cost records it at the end of each idle window), and the
tables RESULTS.md shows of it and of benchmarks.cost's import steps. Pure: no lab imports."""
from __future__ import annotations

import os
import statistics

from .stats import markdown_table

TARGET_MIB = 30     # issue #17: the user path's steady RSS with 5,000 idle processes

# First match wins; a mapping's path is "" when it has none (anonymous).
MAPPING_GROUPS: tuple[tuple[str, object], ...] = (
    ("Python's objects and the C heap (anonymous: [heap] and unnamed mappings)",
     lambda p: p in ("", "[heap]")),
    ("the python3 executable (its code and data)", lambda p: os.path.basename(p).startswith("python3")),
    ("psycopg's C modules, libpq and the libraries libpq links (its OpenSSL, Kerberos, LDAP, SASL)",
     lambda p: "psycopg" in p or "/libpq" in p),
    ("the C library (libc, libm, the dynamic loader)",
     lambda p: os.path.basename(p).startswith(("libc.so", "libm.so", "ld-linux"))),
    ("Python's C extension modules (lib-dynload: _decimal, _ctypes, _lzma, ...)", lambda p: "/lib-dynload/" in p),
    ("other shared libraries and files (libz, libexpat, liblzma, libffi, the locale, ...)", lambda p: True),
)


def by_mapping(smaps: str) -> dict[str, float]:
    """MiB of RSS per MAPPING_GROUPS label, from the text of /proc/PID/smaps."""
    out = {label: 0.0 for label, _ in MAPPING_GROUPS}
    label = None
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):        # a mapping's header
            path = head[5].strip() if len(head) == 6 else ""
            label = next(name for name, match in MAPPING_GROUPS if match(path))
        elif head and head[0] == "Rss:" and label is not None:
            out[label] += int(head[1]) / 1024
    return out


# The daemon's imports up to psycopg's step made another way, each said against that step:
# (its key in the cost results, the words before its figures, the words after).
IMPORT_VARIANTS = (
    ("imports_deb", "The .deb's psycopg (Debian's python3-psycopg: its pure-Python wrapper over the system's libpq5, "
     "where the venv above has psycopg-binary's C one; PSYCOPG_IMPL=python, `benchmarks/cost.py` imports_deb): the "
     "same imports up to psycopg's step are", ": a .deb install runs that much above the rows of this section."),
    ("imports_asyncio", "asyncio, which psycopg and tenacity import for their async APIs (dbguard never calls them), "
     "is left out: they are imported with a stand-in that loads it at the first async call (dbguard/lean.py). With "
     "it (`benchmarks/cost.py` imports_asyncio), the same imports up to psycopg's step are", "."),
    ("imports_from_source", "Without bytecode (dbguard's modules compiled from source at each start, as a checkout "
     "runs where PYTHONDONTWRITEBYTECODE=1, and as this benchmark measured before 2026-12-02; `benchmarks/cost.py` "
     "imports_from_source): the same imports are", ". An installed dbguard has its bytecode (pip and the .deb's "
     "py3compile compile it), and so have the runs above."),
)


def made_of_lines(cost: dict) -> list[str]:
    """RESULTS.md's lines on what the RSS is made of: the daemon's mappings, then the import steps."""
    lines: list[str] = []
    cases = [(f"dbguard-user{', +{:,} idle processes'.format(extra) if extra else ''}",
              [r["rss_by_mapping_mib"] for r in cost.get("dbguard-user", {}).get("runs", [])
               if not r.get("error") and r.get("extra_processes", 0) == extra and r.get("rss_by_mapping_mib")])
             for extra in (0, 5000)]
    cases = [(name, runs) for name, runs in cases if runs]
    if cases:
        labels = [label for label, _ in MAPPING_GROUPS]
        rows = [[label, *(f"{statistics.median(r[label] for r in runs):.1f} MiB" for _, runs in cases)]
                for label in labels]
        rows.append(["total (RSS steady)", *(f"{statistics.median(sum(r.values()) for r in runs):.1f} MiB"
                                             for _, runs in cases)])
        lines += ["The steady RSS of the user path by mapping (/proc/PID/smaps at the end of the idle window, "
                  "median over the runs; `benchmarks/rss.py` MAPPING_GROUPS):", "",
                  markdown_table(["mapping", *(name for name, _ in cases)], rows), ""]
    steps = [s for s in cost.get("imports", []) if isinstance(s, dict) and not s.get("error")]
    pg = next((s for s in steps if s["step"].startswith("+ psycopg")), None)
    if steps:
        lines += ["What the RSS is made of: a fresh interpreter after each step's imports, cumulative "
                  "(median of 3; `benchmarks/cost.py` IMPORT_STEPS):", "",
                  markdown_table(["imports", "RSS", "of which anonymous", "added"],
                                 [[s["step"], f"{s['rss_mib']:.1f} MiB", f"{s['anon_mib']:.1f} MiB",
                                   f"+{s['rss_mib'] - steps[i - 1]['rss_mib']:.1f} MiB" if i else "–"]
                                  for i, s in enumerate(steps)]), ""]
        for key, before, after in IMPORT_VARIANTS:
            m = cost.get(key) or {}
            if pg and "rss_mib" in m:
                lines += [f"{before} {m['rss_mib']:.1f} MiB ({m['anon_mib']:.1f} MiB anonymous), "
                          f"{m['rss_mib'] - pg['rss_mib']:+.1f} MiB against {pg['rss_mib']:.1f} MiB{after}", ""]
    return lines + _remaining(cases, steps, pg)


def _added(steps: list[dict], prefix: str) -> float | None:
    i = next((i for i, s in enumerate(steps) if s["step"].startswith(prefix)), None)
    return steps[i]["rss_mib"] - steps[i - 1]["rss_mib"] if i else None


def _remaining(cases: list[tuple[str, list[dict]]], steps: list[dict], pg: dict | None) -> list[str]:
    """Issue #17's target against the figures above, and what the rest is, said from them."""
    runs = dict(cases)
    at_rest, crowded = runs.get("dbguard-user"), runs.get("dbguard-user, +5,000 idle processes")
    parts = {k: _added(steps, k) for k in ("+ dbguard's daemon", "+ psycopg")}
    if not (at_rest and crowded and pg) or None in parts.values():
        return []
    steady = [statistics.median(sum(r.values()) for r in rs) for rs in (at_rest, crowded)]
    own = parts["+ dbguard's daemon"]
    verdict = "meets it" if steady[1] <= TARGET_MIB else f"misses by {steady[1] - TARGET_MIB:.1f} MiB"
    libs = statistics.median(r[MAPPING_GROUPS[2][0]] for r in at_rest)
    return [f"Issue #17 asks for at most {TARGET_MIB} MiB on the user path with 5,000 idle processes: "
            f"{steady[1]:.1f} MiB here, which {verdict}. By the tables above: "
            f"{steady[1] - steady[0]:.1f} MiB is what 5,000 more processes add (anonymous: what dbguard keeps "
            f"and reads per process, dbguard/sense/proctable.py and procfs.py). The {steady[0]:.1f} MiB at rest "
            f"is nearly all imports: a fresh interpreter that has made the daemon's imports and nothing else "
            f"is {pg['rss_mib']:.1f} MiB. Of it, the interpreter alone (its executable, the C library, "
            f"what any Python process maps) is {steps[0]['rss_mib']:.1f} MiB; dbguard's own modules with the "
            f"standard library they use +{own:.1f} MiB; psycopg 3, the product's PostgreSQL client, with "
            f"tenacity and dbguard's PostgreSQL modules +{parts['+ psycopg']:.1f} MiB, {libs:.1f} MiB of it "
            f"libpq, psycopg's C modules and the libraries libpq links (the mapping table), the rest psycopg's "
            f"Python modules and its adapters' objects. Neither Python's ssl module (_ssl, libssl and "
            f"libcrypto 3: libpq does the TLS) nor asyncio is loaded (dbguard/databases/postgresql/driver.py, "
            f"dbguard/lean.py).", ""]
