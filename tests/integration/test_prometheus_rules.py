"""integrations/prometheus: promtool checks and unit-tests the alert rules; every name the rules
and the Grafana dashboard query is one a real Metrics instance exports when scraped."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from dbguard.metrics import Metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import exported_names, feed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "integrations" / "prometheus"
RULES = PROM / "dbguard-rules.yml"
DASHBOARD = PROM / "grafana-dashboard.json"
# Series Prometheus makes itself for every scrape target; the "dbguard down" alert needs one.
PROMETHEUS_OWN = {"up"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


def promtool() -> str:
    path = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if not path:
        pytest.fail("promtool is missing: run `bash scripts/setup-integrations.sh` "
                    "(takes promtool from Debian's prometheus package)")
    return path


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels, keywords, durations)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*(?![\w(])(?!\s*\()", e):
        if m.group(0).lower() not in _KEYWORDS:
            names.add(m.group(0))
    return names


def dashboard_queries(node) -> list[str]:
    """Every PromQL in a dashboard: panel targets' expr and the metric inside label_values()."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                found.append(v)
            elif k in ("query", "definition") and isinstance(v, str) and v.startswith("label_values("):
                found.append(re.match(r"label_values\((.*),\s*\w+\)$", v).group(1))
            else:
                found += dashboard_queries(v)
    elif isinstance(node, list):
        for v in node:
            found += dashboard_queries(v)
    return found


@pytest.fixture(scope="module")
def scraped() -> str:
    """A scrape of /metrics over HTTP after one of every observation."""
    m = Metrics("127.0.0.1:0")
    try:
        feed_everything(m)
        m.observe_bpf_counters({"kills": 3, "map_full": 0})
        with urllib.request.urlopen("http://%s:%d/metrics" % m.address, timeout=5) as r:
            return r.read().decode()
    finally:
        m.close()


@pytest.fixture(scope="module")
def scraped_names(scraped) -> set[str]:
    return exported_names(scraped)


def test_promtool_check_metrics_finds_nothing_in_a_scrape(scraped):
    """dbguard writes its exposition itself (dbguard/exposition.py): Prometheus's own linter
    must parse it and find no problem (names, types, help, _total on counters)."""
    r = subprocess.run([promtool(), "check", "metrics"], input=scraped, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    assert "dbguard_bpf_program_events_total{counter=\"kills\"} 3.0" in scraped


def test_name_extraction_finds_names_and_ignores_the_rest():
    expr = ('sum by (kind, outcome) (rate(dbguard_actions_total{instance=~"$instance", x="a{b}"}'
            '[$__rate_interval])) / on(instance) group_left(version) dbguard_build_info offset 5m '
            '> bool 0 and 1 - dbguard_collector_success')
    assert metric_names(expr) == {"dbguard_actions_total", "dbguard_build_info", "dbguard_collector_success"}
    assert metric_names("time() - dbguard_nope_seconds") == {"dbguard_nope_seconds"}


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 9 rules found" in r.stdout


def test_promtool_unit_tests_of_the_alerts():
    r = subprocess.run([promtool(), "test", "rules", "dbguard-rules.test.yml"], cwd=PROM,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_the_issue_asks_for_is_there_and_unit_tested():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert {"DbguardProtectionBreach", "DbguardDatabaseOOMKilled", "DbguardDown", "DbguardBpfPathOff",
            "DbguardHighPressureSustained", "DbguardCachesShrunkTooLong"} <= alerts
    tests = yaml.safe_load((PROM / "dbguard-rules.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert tested == alerts, f"alerts without a firing unit test: {sorted(alerts - tested)}"


def test_alert_rules_use_only_exported_metrics(scraped_names):
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {name for r in rules for name in metric_names(r["expr"])}
    assert used, "no metric names found in the rules"
    assert used - scraped_names - PROMETHEUS_OWN == set()


def test_dashboard_queries_use_only_exported_metrics(scraped_names):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    used = {name for q in queries for name in metric_names(q)}
    assert len(queries) >= 10 and used
    assert used - scraped_names == set()


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each dashboard query as a recording rule (Grafana's variables filled in)."""
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    rules = [{"record": f"dashboard:query{i}", "expr": q.replace("$__rate_interval", "5m")}
             for i, q in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_links_its_runbook_section():
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            url = r["annotations"].get("runbook_url", "")
            path, _, anchor = url.partition("#")
            assert path == "docs/runbook.md" and anchor in anchors, (r["alert"], url)


def test_a_stale_sidecar_alert_watches_the_last_cycle():
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert "dbguard_last_snapshot_timestamp_seconds" in rules["DbguardStale"]["expr"]


def test_dashboard_filters_by_job_and_cluster_and_marks_kills_and_level_changes():
    board = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert {"job", "cluster", "instance"} <= set(names)
    assert names.index("job") < names.index("cluster") < names.index("instance")   # each narrows the next
    panel_queries = dashboard_queries(board["panels"])
    missing = [q for q in panel_queries if 'job=~"$job"' not in q or 'cluster=~"$cluster"' not in q]
    assert missing == []
    annotations = {a["name"]: a.get("expr", "") for a in board["annotations"]["list"]}
    assert 'kind="kill"' in annotations["dbguard kills"]
    assert "dbguard_bpf_kills_total" in annotations["BPF kills"]
    assert "changes(dbguard_pressure_level" in annotations["Level changes"]
