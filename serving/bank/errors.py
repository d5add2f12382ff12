"""Exception types of the serving runtime, under increlora's IncreLoraError; each message says what to do.

One type per condition. The HTTP status each is answered with is in serving/http/errors.py.
"""
from __future__ import annotations

from increlora.errors import AdapterFormatError, IncreLoraError


class ServingError(IncreLoraError):
    """Base class of the errors the serving runtime raises on purpose."""


class UnknownTaskError(ServingError, KeyError):
    """A task name that is not loaded in the bank (also a KeyError, like a missing dict key).

    removed: the task was loaded when the request came and removed before it was answered.
    """

    def __init__(self, task: str, known: list[str] | tuple[str, ...] = (), *, removed: bool = False) -> None:
        self.task = task
        self.known = sorted(known)
        self.removed = removed
        shown = self.known[:20] + (["..."] if len(self.known) > 20 else [])
        when = " (removed while the request waited)" if removed else ""
        super().__init__(f"unknown task {task!r}{when}; loaded tasks: {shown}. Load its adapter with bank.add(path)")

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])

    def __reduce__(self):  # rebuilt from its fields when it crosses from the model process
        return _unknown_task, (type(self), self.task, self.known, self.removed)


def _unknown_task(cls: type, task: str, known: list[str], removed: bool) -> UnknownTaskError:
    return cls(task, known, removed=removed)


class NoAdapterFolderError(UnknownTaskError):
    """A task name that is no adapter folder in a bank's catalogue (a name with a path in it included)."""

    def __init__(self, task: str, root: str = "") -> None:
        super().__init__(task)
        self.root = root
        self.args = (f"no adapter folder {task!r} in {root or 'the adapter folder'}: the tasks served are the names "
                     f"of the adapter folders in it",)

    def __reduce__(self):
        return NoAdapterFolderError, (self.task, self.root)


class TaskLoadError(ServingError):
    """A task's adapter folder failed to load on first use; the same error answers until its files change."""

    def __init__(self, task: str, problem: str) -> None:
        super().__init__(f"task {task!r} cannot be loaded: {problem}; it is tried again once its folder changes")
        self.task, self.problem = task, problem

    def __reduce__(self):
        return TaskLoadError, (self.task, self.problem)


class PinError(ServingError, ValueError):
    """Pinning refused: over the bank's residency limit, or a bank that holds every task anyway."""


class DuplicateTaskError(ServingError, ValueError):
    """An adapter's task name is already loaded in the bank."""


class AdapterShapeError(AdapterFormatError):
    """An adapter's modules or tensors do not fit the bank's base model."""


class InputError(ServingError, ValueError):
    """predict() was called with no inputs, inputs of a wrong type, or a task list of another length."""


class WrongTaskKindError(ServingError, ValueError):
    """A task of another kind than a call needs (embed on a classifier, rerank on an embedding task, ...)."""

    def __init__(self, task: str, task_type: str, wanted: str, detail: str = "") -> None:
        self.task, self.task_type, self.wanted, self.detail = task, task_type, wanted, detail
        article = "an" if task_type[:1] in ("a", "e", "i", "o", "u") else "a"
        super().__init__(f"task {task!r} is {article} {task_type} task; {wanted}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # rebuilt from its fields when it crosses from the model process
        return type(self), (self.task, self.task_type, self.wanted, self.detail)


class NonFiniteOutputError(ServingError, ArithmeticError):
    """The model gave NaN or inf logits for some rows (e.g. float16 overflow, or a broken head)."""


class BankLoadError(ServingError, ValueError):
    """No base model could be chosen, or nothing could be loaded."""


class WorkerDiedError(ServingError):
    """The model process is gone (crashed or killed); the server must be restarted."""


__all__ = ["AdapterShapeError", "BankLoadError", "DuplicateTaskError", "InputError", "NoAdapterFolderError",
           "NonFiniteOutputError", "PinError", "ServingError", "TaskLoadError", "UnknownTaskError", "WorkerDiedError",
           "WrongTaskKindError"]
