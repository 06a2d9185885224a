"""dbguard: keeps PostgreSQL and MySQL/MariaDB alive under memory pressure."""

# The distribution's name on PyPI; the command and the import name stay `dbguard` (the PyPI
# name `dbguard` belongs to an unrelated project).
DISTRIBUTION = "dbguard-sidecar"


def __getattr__(name: str) -> str:
    # One place for the version: pyproject.toml, as installed (wheel, .deb or `pip install -e`).
    # Read on first use: importlib.metadata pulls in the email package (~8 MB of RSS and 15 ms)
    # for every `import dbguard`, the lab's hogs included, which then outgrow the sizes tests give them.
    if name != "__version__":
        raise AttributeError(f"module 'dbguard' has no attribute {name!r}")
    value = _installed_version()
    if value is None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version(DISTRIBUTION)
        except PackageNotFoundError:        # a source tree run without installing it
            value = "0+unknown"
    globals()["__version__"] = value
    return value


def _installed_version() -> str | None:
    """The Version: of the first dbguard-sidecar metadata on sys.path, found as importlib.metadata
    finds it (NAME-VERSION.dist-info/METADATA, NAME.egg-info/PKG-INFO), without importing it:
    the daemon keeps every module it imports for as long as it runs (~4 MiB of RSS for this)."""
    import os
    import sys
    want = DISTRIBUTION.replace("-", "_")
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for n in names:
            stem, dot, kind = n.rpartition(".")
            if kind not in ("dist-info", "egg-info") or stem.split("-")[0].lower() != want:
                continue
            try:
                with open(os.path.join(entry or ".", n, "METADATA" if kind == "dist-info" else "PKG-INFO"),
                          encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():
                            break       # the headers end at the first empty line
            except OSError:
                continue
    return None
