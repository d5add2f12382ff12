"""The bank's tasks as an immutable snapshot; add/remove build a new one that replaces the old in one step.

A batch reads the bank's snapshot once and uses it throughout, so it never sees a half-added task
and a task removed meanwhile still finishes the batches that already hold it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from .errors import DuplicateTaskError, UnknownTaskError
from .task_adapter import TaskAdapter


class TaskRegistry:
    """Immutable mapping of task name to TaskAdapter."""

    def __init__(self, tasks: Mapping[str, TaskAdapter] | None = None) -> None:
        self._tasks: Mapping[str, TaskAdapter] = MappingProxyType(dict(tasks or {}))

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    def get(self, name: str) -> TaskAdapter:
        try:
            return self._tasks[name]
        except (KeyError, TypeError):
            raise UnknownTaskError(name, list(self._tasks)) from None

    def values(self) -> Iterable[TaskAdapter]:
        return self._tasks.values()

    def check_absent(self, name: str, path: object) -> None:
        """DuplicateTaskError when a task of this name is loaded already."""
        _check_absent(self._tasks, name, path)

    def with_tasks(self, added: Iterable[TaskAdapter]) -> TaskRegistry:
        tasks = dict(self._tasks)
        for task in added:
            _check_absent(tasks, task.name, task.path)
            tasks[task.name] = task
        return TaskRegistry(tasks)

    def without(self, name: str) -> TaskRegistry:
        if name not in self._tasks:
            raise UnknownTaskError(name, list(self._tasks))
        return TaskRegistry({k: v for k, v in self._tasks.items() if k != name})


def _check_absent(tasks: Mapping[str, TaskAdapter], name: str, path: object) -> None:
    if name in tasks:
        raise DuplicateTaskError(f"{path}: task {name!r} is already loaded (from {tasks[name].path}); "
                                 f"remove it first with bank.remove({name!r})")
