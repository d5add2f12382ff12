"""Errors of the HTTP service. Each carries the HTTP status it is answered with and a message for the client."""
from __future__ import annotations

from typing import Any

from increlora.errors import IncreLoraError


class ServiceError(IncreLoraError):
    """Base of the errors the HTTP service answers on purpose: `status_code`, a message, optional extra fields."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, **self.extra}


class TaskNotFoundError(ServiceError):
    """The request names a task the server has no adapter for (or one removed while it waited)."""

    status_code = 404

    def __init__(self, task: str, known_tasks: list[str], *, removed: bool = False) -> None:
        what = "was removed while the request waited" if removed else "is not loaded"
        super().__init__(f"task {task!r} {what}; known tasks: {sorted(known_tasks)}",
                         known_tasks=sorted(known_tasks))
        self.task = task


class TooManyInputsError(ServiceError):
    """More inputs in one request than the server's --max-inputs."""

    status_code = 413


class InputTooLongError(ServiceError):
    """An input longer than the model's max length, in a request that asked for no truncation."""

    status_code = 413


class BodyTooLargeError(ServiceError):
    """The request body is over the server's --max-body-bytes."""

    status_code = 413


class NotReadyError(ServiceError):
    """The adapters are still loading (or failed to load); the server cannot answer predictions yet."""

    status_code = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class QueueFullError(ServiceError):
    """The batcher's queue is full; the client should retry after a moment."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class BatcherClosedError(ServiceError):
    """The server is shutting down and takes no new predictions."""

    status_code = 503


class RequestTimeoutError(ServiceError):
    """A prediction did not finish within the server's --request-timeout."""

    status_code = 504


class PredictionError(ServiceError):
    """The model failed on a request's inputs (a bug or a resource problem on the server, logged there)."""

    status_code = 500


class AdminDisabledError(ServiceError):
    """Admin endpoints are off: the server was started without an admin token."""

    status_code = 403


class UnauthorizedError(ServiceError):
    """Missing or wrong bearer token on an admin endpoint."""

    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AdapterNameError(ServiceError):
    """An adapter name that is not a plain folder name inside the server's adapter folder."""

    status_code = 400


class AdapterNotFoundError(ServiceError):
    """No adapter folder of that name in the server's adapter folder."""

    status_code = 404


class AdapterConflictError(ServiceError):
    """The adapter's task is already loaded; remove it first to reload it."""

    status_code = 409


class AdapterLoadError(ServiceError):
    """The adapter folder exists but cannot be loaded (bad files, another base model)."""

    status_code = 422
