"""Error types shared by the library, the CLI, the handler and the extension service.

Every error that reaches a user says which item failed, what arrived and what is accepted.
``http_status`` is the one place that maps an error to an HTTP status code.
"""

from __future__ import annotations


class TmuError(Exception):
    """Base class of every error tmu-serve raises on purpose."""


class InvalidInputError(TmuError, ValueError):
    """The caller sent something malformed or out of range."""


class UnknownIdsError(InvalidInputError):
    """Sample or owner ids that the training index does not hold.

    Attributes:
        ids: the unknown ids, sorted.
        kind: ``"sample"`` or ``"owner"``.
    """

    def __init__(self, ids: list[str], kind: str = "sample") -> None:
        self.ids = sorted(ids)
        self.kind = kind
        shown = ", ".join(self.ids[:20]) + (f" and {len(self.ids) - 20} more" if len(self.ids) > 20 else "")
        super().__init__(f"{len(self.ids)} unknown {kind} id(s): {shown}")


class ModelNotFoundError(TmuError):
    """No model (or model version) of that name is known."""


class JobNotFoundError(TmuError):
    """No job of that id is known."""


class CheckpointError(TmuError):
    """A checkpoint or artifact file is missing, corrupt or does not match its metadata."""


class ConflictError(TmuError):
    """The request clashes with the current state (for example a rollback past a forget)."""


class AuthError(TmuError):
    """A request came without a token, or with a wrong one."""


class DivergedError(TmuError):
    """An unlearning method's loss became NaN or infinite: its settings (a learning rate too high for the model)
    do not fit this model. The model it was given is left as it was."""


class ServerError(TmuError):
    """TorchServe or the extension service did not answer as expected."""


_STATUS = (
    (UnknownIdsError, 404),
    (InvalidInputError, 400),
    (ModelNotFoundError, 404),
    (JobNotFoundError, 404),
    (ConflictError, 409),
    (AuthError, 401),
    (CheckpointError, 500),
    (ServerError, 502),
)


def http_status(err: Exception) -> int:
    """The HTTP status code for an error: 4xx for the caller's mistakes, 5xx for ours."""
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500
