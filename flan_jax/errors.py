"""The one exception type for mistakes a user can fix (bad names, files, flags)."""


class UserError(ValueError):
    """A configuration or input error; the CLI prints its message without a traceback."""
