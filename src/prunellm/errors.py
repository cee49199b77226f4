"""The one exception type for bad input: its message is one line naming the flag or file and what is valid."""


class PrunellmError(ValueError):
    """Bad input or an unmet precondition. The CLI prints ``error: <message>`` and exits with status 2."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for one-line error messages."""
    lines = str(exc).strip().splitlines()
    detail = f": {lines[0][:200]}" if lines else ""
    return f"{type(exc).__name__}{detail}"
