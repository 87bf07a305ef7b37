"""The one exception type for problems the user can fix (bad config, data, paths)."""


class RlhfkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2.

    The message names the file, key or row at fault and says what to do.
    """


def fail(message: str) -> "RlhfkitError":
    """Build an `RlhfkitError`; used as `raise fail(...)` to keep call sites short."""
    return RlhfkitError(message)
