"""The one exception type that the command line turns into a one-line error message."""


class QwenRefError(Exception):
    """Bad input from the user: a missing file, a corrupt checkpoint, an unsupported config, a bad token.

    The message is complete on its own (it names the file, field or tensor), so the command line
    prints it as a single line and exits non-zero without a traceback.
    """
