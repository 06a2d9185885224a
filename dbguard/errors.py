"""Errors that reach the user as one line: what is wrong and how to fix it."""


class DbguardError(Exception):
    """A problem the operator can fix; printed as one line, never a traceback."""


class ConfigError(DbguardError):
    """The configuration file is invalid; the message names the key."""
