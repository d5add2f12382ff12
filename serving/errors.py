"""Exception types of the serving runtime; each message says what to do about it."""
from __future__ import annotations

from increlora.errors import AdapterFormatError, IncreLoraError


class ServingError(IncreLoraError):
    """Base class of the errors the adapter bank raises on purpose."""


class UnknownTaskError(ServingError, KeyError):
    """A task name that is not loaded in the bank (also a KeyError, like a missing dict key)."""

    def __init__(self, task: str, known: list[str] | tuple[str, ...] = ()) -> None:
        self.task = task
        self.known = sorted(known)
        shown = self.known[:20] + (["..."] if len(self.known) > 20 else [])
        super().__init__(f"unknown task {task!r}; loaded tasks: {shown}. Load its adapter with bank.add(path)")

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])

    def __reduce__(self):  # rebuilt from its fields when it crosses from the model process
        return type(self), (self.task, self.known)


class DuplicateTaskError(ServingError, ValueError):
    """An adapter's task name is already loaded in the bank."""


class AdapterShapeError(AdapterFormatError):
    """An adapter's modules or tensors do not fit the bank's base model."""


class InputError(ServingError, ValueError):
    """predict() was called with no inputs, inputs of a wrong type, or a task list of another length."""


class NonFiniteOutputError(ServingError, ArithmeticError):
    """The model gave NaN or inf logits for some rows (e.g. float16 overflow, or a broken head)."""


class BankLoadError(ServingError, ValueError):
    """No base model could be chosen, or nothing could be loaded."""


__all__ = ["AdapterShapeError", "BankLoadError", "DuplicateTaskError", "InputError", "NonFiniteOutputError",
           "ServingError", "UnknownTaskError"]
