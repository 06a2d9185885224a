"""dbguard: keeps PostgreSQL and MySQL/MariaDB alive under memory pressure."""

__version__ = "0.1.0"
