"""Errors a user can fix. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or environment; the message names the value and the fix."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrackingError(UserError):
    pass


class StopTraining(Exception):
    """Raised from an epoch callback to end training early on purpose (a pruned sweep trial).

    The tracked run ends with `status` and `tags` say why; nothing logged so far is lost.
    """

    def __init__(self, message: str, status: str, tags: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.tags = tags
