"""integrations/kubernetes: manifests validated offline against the Kubernetes schemas, plus the
properties the design asks of them (capabilities not privileged, mounts, config sources)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from dbguard import config, units

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "integrations" / "kubernetes"
# Validated against the Kubernetes schemas; servicemonitor.yaml is a Prometheus Operator CRD the
# validator has no schema for, checked below against the Service it selects.
MANIFESTS = [K8S / "daemonset.yaml", K8S / "postgres-sidecar.yaml"]
# Oldest Kubernetes the manifests claim to work on, and the newest the validator knows.
VERSIONS = ("1.30.0", "1.37.0")


def validator() -> str:
    path = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) \
        or shutil.which("kubernetes-validate")
    if not path:
        pytest.fail("kubernetes-validate is missing: run `bash scripts/setup-integrations.sh` "
                    "(pip package kubernetes-validate into .venv)")
    return path


def docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / name).read_text()) if d}


def pod_spec(name: str) -> dict:
    d = docs(name)
    return (d.get("DaemonSet") or d["StatefulSet"])["spec"]["template"]["spec"]


def container(spec: dict, name: str = "dbguard") -> dict:
    return next(c for c in spec["containers"] if c["name"] == name)


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_strict_schema_validation(version):
    assert sorted(p.name for p in K8S.glob("*.yaml")) == ["daemonset.yaml", "postgres-sidecar.yaml",
                                                          "servicemonitor.yaml"]
    r = subprocess.run([validator(), "--strict", "-k", version, *map(str, MANIFESTS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed for resource") == 9, r.stdout


def test_validation_rejects_a_broken_manifest(tmp_path):
    broken = tmp_path / "broken.yaml"
    ds = docs("daemonset.yaml")["DaemonSet"]
    ds["spec"]["template"]["spec"]["hostPid"] = True          # misspelt field
    broken.write_text(yaml.safe_dump(ds))
    r = subprocess.run([validator(), "--strict", "-k", VERSIONS[0], str(broken)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "hostPid" in r.stdout + r.stderr


def test_daemonset_uses_capabilities_not_privileged():
    spec = pod_spec("daemonset.yaml")
    assert spec["hostPID"] is True
    sc = container(spec)["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # What it needs and no more: no SYS_ADMIN (no setns, no mounts: a database container is
    # reached through /proc/<pid>/root, which SYS_PTRACE opens), no NET_ADMIN, no SYS_CHROOT.
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "DAC_OVERRIDE", "DAC_READ_SEARCH", "IPC_LOCK", "KILL",
                                                 "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"]


def test_daemonset_discovers_databases_in_every_pod_and_its_example_entry_is_valid():
    cm = docs("daemonset.yaml")["ConfigMap"]
    text = cm["data"]["dbguard.toml"]
    cfg = config.from_dict(tomllib.loads(text))
    assert cfg.databases == () and cfg.general.discover, "discovery finds the database containers"
    comment = (K8S / "daemonset.yaml").read_text().split("#   [[databases]]", 1)[1].split("dbguard.toml:", 1)[0]
    example = "[[databases]]\n" + "\n".join(line.strip().removeprefix("#").strip()
                                            for line in comment.splitlines() if line.strip())
    db, = config.from_dict(tomllib.loads(example)).databases
    assert db.namespace_of.startswith("/sys/fs/cgroup/") and db.socket.startswith("/")


def test_daemonset_mounts_what_bcc_and_cgroups_need():
    spec = pod_spec("daemonset.yaml")
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in container(spec)["volumeMounts"]}
    for path in ("/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src"):
        assert path in mounts and host[mounts[path]["name"]] == path, path
    assert "/sys/kernel/tracing" in mounts or "/sys/kernel/debug" in mounts
    for path in ("/lib/modules", "/usr/src", "/sys/kernel/tracing", "/sys/fs/cgroup"):
        assert mounts[path].get("readOnly") is True, f"{path} should be read-only"


def test_sidecar_shares_the_process_namespace_and_takes_config_and_dsn_from_the_cluster():
    d = docs("postgres-sidecar.yaml")
    spec = pod_spec("postgres-sidecar.yaml")
    assert spec["shareProcessNamespace"] is True
    assert {c["name"] for c in spec["containers"]} == {"postgres", "dbguard", "redis"}
    dbg = container(spec)
    assert dbg["securityContext"]["privileged"] is False
    config_volume = next(v for v in spec["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == d["ConfigMap"]["metadata"]["name"]
    secret_refs = [e["secretRef"]["name"] for e in dbg.get("envFrom", []) if "secretRef" in e]
    secrets = [doc for doc in yaml.safe_load_all((K8S / "postgres-sidecar.yaml").read_text())
               if doc["kind"] == "Secret"]
    dsn_secret = next(s for s in secrets if s["metadata"]["name"] in secret_refs)
    cfg = config.from_dict(tomllib.loads(d["ConfigMap"]["data"]["dbguard.toml"]))
    assert cfg.databases[0].password_env in dsn_secret["stringData"]
    assert {"PGHOST", "PGUSER"} <= set(dsn_secret["stringData"])
    assert "password" not in cfg.databases[0].dsn
    assert [(c.kind, c.url) for c in cfg.caches] == [("redis", "redis://127.0.0.1:6379")], \
        "the sidecar example shows the application's cache next to the database"
    # ... and that cache is in the pod, as the entry describes it: its port, a policy that evicts
    redis = container(spec, "redis")
    assert [p["containerPort"] for p in redis["ports"]] == [int(cfg.caches[0].url.rsplit(":", 1)[1])]
    args = dict(zip(redis["args"][::2], redis["args"][1::2]))
    assert args["--maxmemory-policy"].startswith("allkeys-"), "a noeviction Redis would be left alone"
    assert units.parse_size(args["--maxmemory"].replace("mb", "MiB")) > cfg.caches[0].floor


@pytest.mark.parametrize("name", ["daemonset.yaml", "postgres-sidecar.yaml"])
def test_configmap_toml_is_a_valid_dbguard_config(name):
    cm = docs(name)["ConfigMap"]
    cfg = config.from_dict(tomllib.loads(cm["data"]["dbguard.toml"]))
    port = cfg.metrics.listen.rsplit(":", 1)[1]
    probe = container(pod_spec(name))["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container(pod_spec(name))["ports"]}
    assert ports[probe["port"]] == int(port)


def test_namespace_carries_the_pod_security_level_hostpid_needs():
    labels = docs("daemonset.yaml")["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert docs("daemonset.yaml")["DaemonSet"]["metadata"]["namespace"] == docs("daemonset.yaml")["Namespace"][
        "metadata"]["name"]


def test_servicemonitor_selects_the_metrics_service_and_names_the_job_the_alerts_expect():
    sm = docs("servicemonitor.yaml")["ServiceMonitor"]
    service = docs("daemonset.yaml")["Service"]
    ds = docs("daemonset.yaml")["DaemonSet"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"] and "metrics" in port_names
    container_ports = {p["name"] for p in container(pod_spec("daemonset.yaml"))["ports"]}
    assert all(p["targetPort"] in container_ports for p in service["spec"]["ports"])
    # the job label comes from the Service's label: "dbguard", as dbguard-rules.yml expects
    assert service["metadata"]["labels"][sm["spec"]["jobLabel"]] == "dbguard"


def test_sidecar_state_outlives_the_pod():
    sts = docs("postgres-sidecar.yaml")["StatefulSet"]
    spec = sts["spec"]["template"]["spec"]
    cfg = config.from_dict(tomllib.loads(docs("postgres-sidecar.yaml")["ConfigMap"]["data"]["dbguard.toml"]))
    mount = next(m for m in container(spec)["volumeMounts"] if m["mountPath"] == cfg.general.state_dir)
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims, "the state directory must be a persistent volume claim, not an emptyDir"
    assert mount["name"] not in {v["name"] for v in spec.get("volumes", [])}
