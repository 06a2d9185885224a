"""PostgreSQL: connection, identity (the postmaster by fact), stats (pure row mapping),
settings (shrink and restore), sessions (cancel/terminate by SQL), discover (local servers),
and the adapter that composes them behind databases.base.Database.

`PostgreSQL` is imported on first use, so the pure modules load without psycopg.
"""


def __getattr__(name: str):
    if name == "PostgreSQL":
        from .adapter import PostgreSQL
        return PostgreSQL
    raise AttributeError(name)
