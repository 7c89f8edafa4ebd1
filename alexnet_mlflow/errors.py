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


class NonFiniteLoss(StopTraining, UserError):
    """The training loss became NaN or infinite: training stops at once and the run ends FAILED."""

    def __init__(self, value: float, epoch: int, step: int, lr: float) -> None:
        super().__init__(
            f"loss became {value} at epoch {epoch}, step {step}: lower --lr (it was {lr:g}) or try another --activation",
            "FAILED", {"nonfinite_loss": f"{value} at epoch {epoch}, step {step}",
                       "nonfinite_epoch": str(epoch), "nonfinite_step": str(step)},
        )


class Terminated(BaseException):
    """SIGTERM, raised where training is, so the run ends KILLED like on Ctrl-C (exit code 143).
    A BaseException, as KeyboardInterrupt is: `except Exception` must not swallow it."""
