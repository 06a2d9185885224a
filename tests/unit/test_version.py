"""dbguard.__version__ without importlib.metadata: the same answer as importlib.metadata (the
oracle) for the metadata this checkout's install left on sys.path, and for a wheel's and an
egg's metadata laid out in a directory of their own."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import dbguard

ROOT = Path(__file__).resolve().parents[2]
ORACLE = "import importlib.metadata as m, sys; print(m.version('dbguard-sidecar'))"
OURS = "import dbguard, sys; print(dbguard._installed_version())"


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["source tree", "elsewhere"])
def test_installed_version_as_importlib_metadata_reads_it(cwd):
    def run(code):
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert run(OURS) == run(ORACLE)


@pytest.mark.parametrize("layout", ["dist-info", "egg-info"])
def test_a_metadata_directory_first_on_the_path_wins(tmp_path, layout, monkeypatch):
    if layout == "dist-info":
        d = tmp_path / "dbguard_sidecar-9.8.7.dist-info"
        d.mkdir()
        (d / "METADATA").write_text("Metadata-Version: 2.1\nName: dbguard-sidecar\nVersion: 9.8.7\n\nVersion: 1\n")
    else:
        d = tmp_path / "dbguard_sidecar.egg-info"
        d.mkdir()
        (d / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: dbguard-sidecar\nVersion: 9.8.7\n")
    (tmp_path / "other_pkg-1.0.dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    import importlib.metadata
    assert dbguard._installed_version() == importlib.metadata.version("dbguard-sidecar") == "9.8.7"


def test_running_dbguard_imports_no_importlib_metadata():
    r = subprocess.run([sys.executable, "-c", "import sys, dbguard.daemon, dbguard.cli; dbguard.__version__; "
                        "print(sorted(m for m in ('importlib.metadata', 'email', 'prometheus_client', 'tenacity', "
                        "'secrets', 'http.server') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
