"""The one exception type the command line turns into a one-line error."""


class FactorportError(Exception):
    """A problem with the user's input: the message names it and the fix."""


def exit_description(code: int | None) -> str:
    """How a child process ended: 'crashed with SIGSEGV' for a signal, 'exited with status 3' otherwise."""
    import signal

    if code is not None and code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name}"
        except ValueError:
            return f"crashed with signal {-code}"
    return f"exited with status {code}"
