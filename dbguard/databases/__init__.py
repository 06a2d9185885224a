"""Database kinds behind databases.base.Database: one package per kind (postgresql/, mysql/),
their facts in registry.py, and what every kind shares (bounded.py, identity.py, steps.py)."""
