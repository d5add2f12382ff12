"""The work behind the prediction and task endpoints, in plain functions, and the per-app service state."""
from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..bank.batch_inputs import ModelInput
from ..bank.errors import UnknownTaskError
from .batcher import DynamicBatcher
from .errors import InputTooLongError, NotReadyError, TooManyInputsError, http_status
from .metrics import UNKNOWN_TASK, ServiceMetrics
from .schemas import ClassPrediction, PredictRequest, PredictResponse, Readiness, RegressionPrediction, TaskInfo
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def is_bank(obj: Any) -> bool:
    """A loaded bank (has predict) rather than a loader (a callable returning one)."""
    return callable(getattr(obj, "predict", None))


class Service:
    """One app's state: settings, metrics, the bank once loaded and its batcher."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.bank: Any = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: BaseException | None = None
        self._loading: asyncio.Task | None = None
        self._loader: Any = None
        self._owns_bank = False  # a bank this service loaded is closed with it (e.g. its model process)
        self._length_tokenizer: Any = None
        self._length_lock = threading.Lock()

    async def start(self, bank_or_loader: Any, on_load_error: Callable[[BaseException], None] | None = None) -> None:
        """Attach a bank now, or start loading one off the event loop (the app answers /health meanwhile)."""
        if is_bank(bank_or_loader):
            self._attach(bank_or_loader)
        elif callable(bank_or_loader):
            self._loader = bank_or_loader
            self._loading = asyncio.get_running_loop().create_task(self._load(bank_or_loader, on_load_error))
        else:
            raise TypeError(f"create_app: expected an AdapterBank or a function returning one, got {bank_or_loader!r}")

    async def _load(self, loader: Callable[[], Any], on_load_error: Callable[[BaseException], None] | None) -> None:
        started = time.perf_counter()
        try:
            bank = await asyncio.to_thread(loader)
        except Exception as exc:
            self.load_error = exc
            logger.error("loading the adapters failed: %s", exc, exc_info=exc)
            if on_load_error is not None:
                on_load_error(exc)
            return
        self._owns_bank = True
        self._attach(bank)
        logger.info("loaded %d tasks in %.1f s: %s", len(bank.tasks), time.perf_counter() - started, list(bank.tasks))

    def _attach(self, bank: Any) -> None:
        s = self.settings
        self.batcher = DynamicBatcher(bank, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                      max_queue=s.max_queue, observer=self.metrics)
        self.batcher.start()
        self.bank = bank
        self.metrics.tasks_loaded.set(len(bank.tasks))

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # the loading thread finishes on its own; its bank is dropped
            cancel = getattr(self._loader, "cancel", None)
            if cancel is not None:  # a ProcessBankLoader: stop the child so that the thread ends now
                cancel()
        if self.batcher is not None:
            await self.batcher.close()
        close = getattr(self.bank, "close", None)
        if self._owns_bank and close is not None:
            await asyncio.to_thread(close)

    def readiness(self) -> Readiness:
        if self.bank is not None and not getattr(self.bank, "alive", True):
            return Readiness(status="failed", detail="the model process is gone; restart the server")
        if self.bank is not None:
            return Readiness(status="ready", tasks=len(self.bank.tasks))
        if self.load_error is not None:
            return Readiness(status="failed", detail=f"loading the adapters failed: {self.load_error}")
        return Readiness(status="loading", detail="the adapters are loading")

    def ready_bank(self) -> Any:
        if self.bank is None or self.readiness().status != "ready":
            raise NotReadyError(self.readiness().detail or "not ready")
        return self.bank

    def token_counts(self, inputs: list[ModelInput]) -> list[int]:
        """Tokens per input with special tokens, untruncated, on a private copy of the bank's tokenizer.

        A private copy under a lock: a fast tokenizer used from two threads with different truncation
        settings fails ("Already borrowed"), and the model's worker thread uses the bank's own.
        """
        with self._length_lock:
            if self._length_tokenizer is None:
                self._length_tokenizer = copy.deepcopy(self.ready_bank().tokenizer)
            return count_tokens(self._length_tokenizer, inputs)


def model_inputs(request: PredictRequest) -> list[ModelInput]:
    """The request's inputs as the bank takes them: str or (str, str), always a list."""
    raw = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    return [x if isinstance(x, str) else (x[0], x[1]) for x in raw]


def check_task(bank: Any, task: str) -> None:
    if task not in bank.tasks:
        raise UnknownTaskError(task, list(bank.tasks))


def check_input_count(inputs: list[ModelInput], max_inputs: int) -> None:
    if len(inputs) > max_inputs:
        raise TooManyInputsError(f"{len(inputs)} inputs in one request; the server takes at most {max_inputs} "
                                 f"(--max-inputs): split the request")


def count_tokens(tokenizer: Any, inputs: list[ModelInput]) -> list[int]:
    counts = [0] * len(inputs)
    singles = [i for i, x in enumerate(inputs) if isinstance(x, str)]
    pairs = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
    if singles:
        ids = tokenizer([inputs[i] for i in singles], truncation=False, verbose=False)["input_ids"]
        counts_at(counts, singles, ids)
    if pairs:
        ids = tokenizer([inputs[i][0] for i in pairs], [inputs[i][1] for i in pairs],
                        truncation=False, verbose=False)["input_ids"]
        counts_at(counts, pairs, ids)
    return counts


def counts_at(counts: list[int], where: list[int], ids: list[list[int]]) -> None:
    for i, row in zip(where, ids):
        counts[i] = len(row)


def check_lengths(counts: list[int], max_length: int) -> None:
    over = [i for i, n in enumerate(counts) if n > max_length]
    if over:
        raise InputTooLongError(f"inputs {over[:10]} have {[counts[i] for i in over[:10]]} tokens, over the model's "
                                f"max length of {max_length}; shorten them or send \"truncate\": true")


def to_response(task: str, answers: list[dict]) -> PredictResponse:
    predictions = [RegressionPrediction(value=a["value"]) if "value" in a
                   else ClassPrediction(label=a["label"], score=a["score"], scores=a["scores"], labels=a.get("labels"))
                   for a in answers]
    return PredictResponse(task=task, predictions=predictions)


async def predict(service: Service, request: PredictRequest) -> PredictResponse:
    """Check the request, queue it for the batcher, shape the answers; records the request's metrics."""
    started = time.perf_counter()
    task_label, status = UNKNOWN_TASK, 500
    try:
        bank = service.ready_bank()
        inputs = model_inputs(request)
        check_input_count(inputs, service.settings.max_inputs)
        check_task(bank, request.task)
        task_label = request.task
        if not request.truncate:
            check_lengths(await asyncio.to_thread(service.token_counts, inputs), bank.max_length)
        answers = await service.batcher.submit(request.task, inputs, service.settings.request_timeout)
        response = to_response(request.task, answers)
        status = 200
        return response
    except Exception as exc:
        status = http_status(exc)  # 500 for an error the service does not answer on purpose
        raise
    finally:
        service.metrics.observe_request(task_label, status, time.perf_counter() - started)


def task_info(bank: Any, task: str) -> TaskInfo:
    check_task(bank, task)
    try:
        info = bank.task_info(task)
    except KeyError:  # removed since the check
        raise UnknownTaskError(task, list(bank.tasks)) from None
    return TaskInfo.model_validate(info)


def task_infos(bank: Any) -> list[TaskInfo]:
    infos = []
    for task in list(bank.tasks):
        try:
            infos.append(task_info(bank, task))
        except UnknownTaskError:
            continue  # removed while listing
    return infos
