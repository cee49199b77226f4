"""The one exception type for bad input: its message is one line naming the flag or file and what is valid."""


class PrunellmError(ValueError):
    """Bad input or an unmet precondition. The CLI prints ``error: <message>`` and exits with status 2."""
