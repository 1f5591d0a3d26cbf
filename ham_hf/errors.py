"""The project's errors: each message names the problem and the fix, and is meant for the user."""


class UserError(ValueError):
    """A mistake in what the user gave: shown as a one-line message, never as a traceback."""


class DataError(UserError):
    """Bad input data: the message names the problem and the offending ids or paths."""


class ImageError(UserError):
    """An input that cannot be used as an image; the message is meant for the person who sent it."""


class ModelError(UserError):
    """The model cannot be used: the message says how to get one that can."""
