"""Errors that reach the user as one line: what is wrong and how to fix it."""


class DbguardError(Exception):
    """A problem the operator can fix; printed as one line, never a traceback."""


class ConfigError(DbguardError):
    """The configuration is invalid; each problem is one line that names the key.

    A validation reports every problem it finds at once (`problems`); str() joins them with
    "; " so a log line (a refused SIGHUP reload) stays one line."""

    def __init__(self, *problems: str):
        super().__init__("; ".join(problems))
        self.problems: tuple[str, ...] = problems
