"""Errors of the HTTP service, and HTTP_STATUS: the one table of the status each error is answered with.

Errors of the bank (an unknown task, a dead model process) keep their own types and are answered from
the table too; anything not in it is a server error (500) that the batcher or FastAPI logs.
"""
from __future__ import annotations

from typing import Any

from ..bank.errors import (
    InputError,
    NoAdapterFolderError,
    PinError,
    ServingError,
    TaskLoadError,
    UnknownTaskError,
    WorkerDiedError,
    WrongTaskKindError,
)


class ServiceError(ServingError):
    """Base of the errors only the HTTP service raises: a message for the client, optional headers and fields."""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    @property
    def status_code(self) -> int:
        return http_status(self)

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, **self.extra}


class TooManyInputsError(ServiceError):
    """More inputs in one request than the server's --max-inputs."""


class InputTooLongError(ServiceError):
    """An input longer than the model's max length, in a request that asked for no truncation."""


class DimensionsError(ServiceError):
    """An embeddings request asked for `dimensions` other than the task's own (vectors are not shortened)."""


class BodyTooLargeError(ServiceError):
    """The request body is over the server's --max-body-bytes."""


class NotReadyError(ServiceError):
    """The adapters are still loading (or failed to load); the server cannot answer predictions yet."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class QueueFullError(ServiceError):
    """The batcher's queue is full; the client should retry after a moment."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class BatcherClosedError(ServiceError):
    """The server is shutting down and takes no new predictions."""


class ModelRestartingError(ServiceError):
    """The model process died and is being started again; the client should retry after a moment."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class BatchCrashedError(ModelRestartingError):
    """The model process died twice running one batch (it and its retry); the batcher then runs the batch's
    requests one by one to find the one at fault (PoisonRequestError)."""


class ModelFailedError(ServiceError):
    """The model process crashed too often (--max-crashes in --crash-window); the server stopped restarting it."""


class RequestTimeoutError(ServiceError):
    """A prediction did not finish within the server's --request-timeout."""


class ClientDisconnectedError(ServiceError):
    """The client disconnected before its answer; the answer (499, as nginx logs it) reaches nobody."""


class PredictionError(ServiceError):
    """The model failed on a request's inputs (a bug or a resource problem on the server, logged there)."""


class PoisonRequestError(PredictionError):
    """The model process died each time it ran this request (in its batch, then alone); it is not retried."""

    def __init__(self, rows: int) -> None:
        super().__init__(f"the model process died (crashed or hung) each time it ran this request ({rows} input(s)); "
                         f"it is not retried, and the server goes on serving other requests. Check these inputs; "
                         f"the server log has the exit code")


class AdminDisabledError(ServiceError):
    """Admin endpoints are off: the server was started without an admin token."""


class UnauthorizedError(ServiceError):
    """Missing or wrong bearer token on an admin endpoint."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyError(ServiceError):
    """Missing or wrong API key on a prediction or listing endpoint (the server runs with --api-key)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AdapterNameError(ServiceError):
    """An adapter name that is not a plain folder name inside the server's adapter folder."""


class AdapterNotFoundError(ServiceError):
    """No adapter folder of that name in the server's adapter folder."""


class AdapterConflictError(ServiceError):
    """The adapter's task is already loaded; remove it first to reload it."""


class AdapterLoadError(ServiceError):
    """The adapter folder exists but cannot be loaded (bad files, another base model)."""


# The status of every error the service answers on purpose (a subclass answers as its nearest listed base).
HTTP_STATUS: dict[type[Exception], int] = {
    AdapterNameError: 400,
    UnauthorizedError: 401,
    ApiKeyError: 401,
    AdminDisabledError: 403,
    UnknownTaskError: 404,
    AdapterNotFoundError: 404,
    AdapterConflictError: 409,
    PinError: 409,
    TooManyInputsError: 413,
    InputTooLongError: 413,
    BodyTooLargeError: 413,
    AdapterLoadError: 422,
    WrongTaskKindError: 422,
    DimensionsError: 422,
    InputError: 422,
    ClientDisconnectedError: 499,
    PredictionError: 500,
    TaskLoadError: 500,
    PoisonRequestError: 500,
    NotReadyError: 503,
    QueueFullError: 503,
    BatcherClosedError: 503,
    WorkerDiedError: 503,
    ModelRestartingError: 503,
    BatchCrashedError: 503,
    ModelFailedError: 503,
    RequestTimeoutError: 504,
}

# "Task not found" over HTTP is the bank's unknown task; the older name stays importable.
TaskNotFoundError = UnknownTaskError


def answered(exc: BaseException) -> bool:
    """Whether the service answers `exc` with its own status and message (it is in HTTP_STATUS)."""
    return any(cls in HTTP_STATUS for cls in type(exc).__mro__)


def http_status(exc: BaseException) -> int:
    """The status `exc` is answered with: its type's entry in HTTP_STATUS, else 500."""
    return next((HTTP_STATUS[cls] for cls in type(exc).__mro__ if cls in HTTP_STATUS), 500)


def error_body(exc: BaseException) -> dict[str, Any]:
    """The JSON body of an error answer (schemas.ErrorBody)."""
    if isinstance(exc, ServiceError):
        return exc.body()
    if isinstance(exc, NoAdapterFolderError):
        return {"detail": str(exc)}
    if isinstance(exc, UnknownTaskError):
        what = "was removed while the request waited" if exc.removed else "is not loaded"
        return {"detail": f"task {exc.task!r} {what}; known tasks: {exc.known}", "known_tasks": exc.known}
    return {"detail": str(exc)}


def error_headers(exc: BaseException) -> dict[str, str]:
    return exc.headers if isinstance(exc, ServiceError) else {}
