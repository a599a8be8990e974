"""The one warning class circuitgraph raises: a result that is computed but could mislead.

The command line prints these as one line each; other libraries' warnings stay quiet there.
"""


class CircuitWarning(UserWarning):
    """Something the user should know about a result or an input (the message says what and why)."""
