"""One error tree under IncreLoraError, and one table of the HTTP status of each error."""
from __future__ import annotations

import inspect

from increlora.errors import IncreLoraError
from serving import ServingError, UnknownTaskError
from serving.bank import errors as bank_errors
from serving.bank.errors import WorkerDiedError
from serving.http import errors as http_errors
from serving.http.errors import HTTP_STATUS, NotReadyError, ServiceError, error_body, error_headers, http_status


def classes(module) -> list[type]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == module.__name__]


def test_every_serving_error_is_in_the_tree():
    for cls in classes(bank_errors) + classes(http_errors):
        assert issubclass(cls, IncreLoraError), cls
    assert issubclass(ServiceError, ServingError) and not issubclass(WorkerDiedError, ServiceError)


def test_every_error_of_the_service_has_its_status_in_the_table():
    for cls in classes(http_errors):
        if cls is not ServiceError:
            assert cls in HTTP_STATUS, f"{cls.__name__} has no HTTP status"
    assert HTTP_STATUS[UnknownTaskError] == 404 and HTTP_STATUS[WorkerDiedError] == 503
    assert http_status(ValueError("not ours")) == 500


def test_unknown_task_is_one_type_answered_with_the_known_tasks():
    assert http_errors.TaskNotFoundError is UnknownTaskError
    exc = UnknownTaskError("nope", ["b", "a"], removed=True)
    assert error_body(exc) == {"detail": "task 'nope' was removed while the request waited; known tasks: ['a', 'b']",
                               "known_tasks": ["a", "b"]}
    assert error_body(UnknownTaskError("nope", ["a"]))["detail"] == "task 'nope' is not loaded; known tasks: ['a']"


def test_a_service_error_carries_its_headers_and_status():
    exc = NotReadyError("loading")
    assert exc.status_code == http_status(exc) == 503 and error_headers(exc) == {"Retry-After": "1"}
    assert error_body(WorkerDiedError("gone")) == {"detail": "gone"} and error_headers(WorkerDiedError("gone")) == {}
