"""The errors the command line reports as a one-line message (no traceback); anything else is a bug and keeps its
traceback."""


class MoekitError(Exception):
    """A user-facing error: bad input, bad config, a missing or corrupted file."""


class ConfigError(MoekitError, ValueError):
    """A bad config value or argument. Also a ``ValueError``, so library code and tests that expect one for a bad
    value keep working, while the command line can tell it from a ``ValueError`` a bug raises."""
