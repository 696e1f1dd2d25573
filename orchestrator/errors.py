"""Errors a user can cause: they end the program with one line and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (config, missing data, bad checkpoint); no traceback is shown."""

    exit_code = 2


class ConfigError(UserError):
    """The sweep file is invalid; the message starts with the field path."""
