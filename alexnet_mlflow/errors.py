"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or environment; the message names the value and the fix."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrackingError(UserError):
    pass
