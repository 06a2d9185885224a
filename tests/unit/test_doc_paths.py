"""Every file of the repository the documentation names exists: a module renamed or split
(dbguard/policy.py became dbguard/policy/) must not leave the README pointing at nothing."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
NAMED = re.compile(r"(?<![\w./-])((?:dbguard|lab|tests|benchmarks|scripts|integrations|docs)/[\w./-]*\w\.(?:py|md|sh|c|h|toml))\b")


def test_every_file_the_docs_name_exists():
    missing = sorted({f"{doc.relative_to(REPO)}: {path}" for doc in DOCS
                      for path in NAMED.findall(doc.read_text()) if not (REPO / path).exists()})
    assert not missing, "\n".join(missing)
