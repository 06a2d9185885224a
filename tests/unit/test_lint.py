"""pyflakes over every Python file of the repository: an undefined name in code that only runs
rarely (a benchmark, an error path) is found here, not by the run that needs it. It found one:
benchmarks/scale.py's cycle under pressure read a `cfg` a refactor had removed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREES = ["dbguard", "lab", "tests", "benchmarks", "integrations"]


def test_no_pyflakes_findings():
    r = subprocess.run([sys.executable, "-m", "flake8", "--select=F", *TREES], cwd=REPO,
                       capture_output=True, text=True)
    assert "No module named flake8" not in r.stderr, "flake8 is missing: `make setup` installs the test extras"
    assert r.returncode == 0 and not r.stdout, r.stdout + r.stderr
