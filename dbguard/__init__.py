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
    from importlib.metadata import PackageNotFoundError, version
    try:
        value = version(DISTRIBUTION)
    except PackageNotFoundError:        # a source tree run without installing it
        value = "0+unknown"
    globals()["__version__"] = value
    return value
