"""The one exception type the command line turns into a one-line error."""


class FactorportError(Exception):
    """A problem with the user's input: the message names it and the fix."""
