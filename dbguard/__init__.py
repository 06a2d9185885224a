"""dbguard: keeps PostgreSQL and MySQL/MariaDB alive under memory pressure."""

from importlib.metadata import PackageNotFoundError, version

# The distribution's name on PyPI; the command and the import name stay `dbguard` (the PyPI
# name `dbguard` belongs to an unrelated project).
DISTRIBUTION = "dbguard-sidecar"

try:
    # One place for the version: pyproject.toml, as installed (wheel, .deb or `pip install -e`).
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:        # a source tree run without installing it
    __version__ = "0+unknown"
