"""The one exception type for problems the user can fix (bad config, data, paths), and how
messages show values."""

import reprlib


class RlhfkitError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2.

    The message names the file, key or row at fault and says what to do.
    """


def fail(message: str) -> "RlhfkitError":
    """Build an `RlhfkitError`; used as `raise fail(...)` to keep call sites short."""
    return RlhfkitError(message)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def one_line(value: object, limit: int = 200) -> str:
    """`str(value)` (an exception's message) on one line, cut to `limit` characters; an exception
    without a message gives its type's name."""
    text = " ".join(str(value).split())[:limit]
    return text or (type(value).__name__ if isinstance(value, BaseException) else "")


def shown(value: object) -> str:
    """`repr(value)` cut to a few dozen characters, in time bounded whatever its size: error messages
    show the start of a huge or deeply nested value, never all of it."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__}>"
