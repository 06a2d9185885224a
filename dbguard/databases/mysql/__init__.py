"""MySQL / MariaDB: connection, facts (what the server is), identity (mysqld by fact), grants,
stats (pure row mapping), buffer_pool (resize and the DBA's size), sessions (read them, KILL
by id), and the adapter that composes them behind databases.base.Database.

`MySQL` is imported on first use, so the pure modules load without PyMySQL.
"""


def __getattr__(name: str):
    if name == "MySQL":
        from .adapter import MySQL
        return MySQL
    raise AttributeError(name)
