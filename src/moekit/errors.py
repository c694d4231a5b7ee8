"""The error type the command line reports as a one-line message (no traceback)."""


class MoekitError(Exception):
    """A user-facing error: bad input, bad config, a missing or corrupted file."""
