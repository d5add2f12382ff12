"""The work behind the prediction and task endpoints, in plain functions, and the per-app service state."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from increlora.adapter_file import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

from ..bank.batch_inputs import ModelInput
from ..bank.errors import InputError, UnknownTaskError, WrongTaskKindError
from .batcher import DynamicBatcher
from .errors import (
    HTTP_STATUS,
    BatcherClosedError,
    ClientDisconnectedError,
    InputTooLongError,
    ModelFailedError,
    ModelRestartingError,
    NotReadyError,
    RequestTimeoutError,
    TooManyInputsError,
    http_status,
)
from .metrics import UNKNOWN_TASK, ServiceMetrics
from .schemas import (
    ClassPrediction,
    EmbeddingPrediction,
    EntitiesPrediction,
    Health,
    PredictRequest,
    PredictResponse,
    Readiness,
    RegressionPrediction,
    TaskInfo,
    TaskList,
)
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0  # on shutdown, the batch the model runs gets this long before its requests are answered 503
CLOSE_TIMEOUT_S = 2.0  # then the model process this long to exit before it is killed
SCRAPE_WAIT_S = 0.2  # a metrics scrape waits this long for the model process's residency figures


def is_bank(obj: Any) -> bool:
    """A loaded bank (has predict) rather than a loader (a callable returning one)."""
    return callable(getattr(obj, "predict", None))


class Service:
    """One app's state: settings, metrics, the bank once loaded and its batcher, predictions in flight."""

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
        self._task_infos: dict[str, dict[str, Any]] = {}  # task -> bank.task_info(task), asked once
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()  # set while no prediction is in flight
        self._idle.set()

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
        batcher = getattr(bank, "batcher_type", DynamicBatcher)  # a bank may batch its own way (RayBank)
        self.batcher = batcher(bank, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                               max_queue=s.max_queue, observer=self.metrics)
        self.batcher.start()
        self.bank = bank
        self.metrics.tasks_loaded.set(len(bank.tasks))
        self.metrics.model_up.set(1)
        if getattr(bank, "catalogue", None) is not None:  # a bank that loads tasks on first use
            # a scrape waits at most SCRAPE_WAIT_S for the model process, then reports the last figures read
            self.metrics.watch_residency(functools.partial(bank.residency_stats, wait=SCRAPE_WAIT_S))
        listen = getattr(bank, "listen", None)  # a SupervisedBank tells when its model process dies
        if listen is not None:
            listen(ModelWatch(self, asyncio.get_running_loop()))

    def model_down(self, error: Exception) -> None:
        """The model process is gone: answer the queued requests with `error` (503) now, not after the restart."""
        if self.batcher is not None:
            failed = self.batcher.fail_queued(error)
            if failed:
                logger.warning("answered %d queued requests 503: the model process is gone", failed)

    async def close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # the loading thread finishes on its own; its bank is dropped
            cancel = getattr(self._loader, "cancel", None)
            if cancel is not None:  # a ProcessBankLoader: stop the child so that the thread ends now
                cancel()
        if self.batcher is not None:
            await self.batcher.close(CLOSE_GRACE_S)
        close = getattr(self.bank, "close", None)
        if self._owns_bank and close is not None:
            await asyncio.to_thread(close, CLOSE_TIMEOUT_S)

    def abort(self) -> None:
        """Stop at once (a second SIGTERM): kill the model process, so that no thread waits for it any longer."""
        self.draining = True
        cancel = getattr(self._loader, "cancel", None)
        if cancel is not None:
            cancel()
        close = getattr(self.bank, "close", None)
        if self._owns_bank and close is not None:
            close(0)

    def readiness(self) -> Readiness:
        tasks = len(self.bank.tasks) if self.bank is not None else 0
        if self.draining:
            return Readiness(status="draining", tasks=tasks, detail="the server is shutting down")
        state = getattr(self.bank, "state", None)  # a SupervisedBank's
        if state in ("restarting", "failed"):
            return Readiness(status=state, tasks=tasks, detail=self.bank.detail)
        if self.bank is not None and not getattr(self.bank, "alive", True):
            return Readiness(status="failed", detail="the model process is gone; restart the server")
        if self.bank is not None:
            return Readiness(status="ready", tasks=tasks)
        if self.load_error is not None:
            return Readiness(status="failed", detail=f"loading the adapters failed: {self.load_error}")
        return Readiness(status="loading", detail="the adapters are loading")

    def health(self) -> Health:
        """Failed only when the model process is no longer restarted: the server cannot recover by itself. Under
        supervision, `model` says how the model process is, and `detail` why it is not up."""
        state = getattr(self.bank, "state", None)
        if state is None:
            return Health()
        return Health(status="failed" if state == "failed" else "ok", model=state, detail=self.bank.detail)

    def ready_bank(self) -> Any:
        readiness = self.readiness()
        if readiness.status == "ready":
            return self.bank
        detail = readiness.detail or "not ready"
        if readiness.status == "draining":
            raise BatcherClosedError("the server is shutting down and takes no new work; send it to another replica")
        if readiness.status == "restarting":
            raise ModelRestartingError(f"{detail}; retry in a moment")
        if readiness.status == "failed" and self.bank is not None and hasattr(self.bank, "state"):
            raise ModelFailedError(detail)
        raise NotReadyError(detail)

    async def task_info(self, bank: Any, task: str, check: Callable[[dict[str, Any]], None] = lambda info: None
                        ) -> dict[str, Any]:
        """The bank's task_info for a loaded task, asked once and kept: a model process answers it between
        batches, so asking on every request would wait behind the model. Admin changes call forget_task.

        check: raises WrongTaskKindError or InputError when the task does not suit the request; a refusal is
        confirmed on fresh info (the task may have been replaced by one of another kind, through another
        ingress, say).
        """
        kept = task in self._task_infos
        info = await self._task_info(bank, task)
        try:
            check(info)
            return info
        except (WrongTaskKindError, InputError):
            if not kept:
                raise
            self.forget_task(task)
        info = await self._task_info(bank, task)
        check(info)
        return info

    async def _task_info(self, bank: Any, task: str) -> dict[str, Any]:
        info = self._task_infos.get(task)
        if info is None:
            try:
                info = await asyncio.to_thread(bank.task_info, task)
            except KeyError:  # removed since the request's check
                raise UnknownTaskError(task, list(bank.tasks)) from None
            self._task_infos[task] = info
        return info

    def forget_task(self, task: str) -> None:
        self._task_infos.pop(task, None)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a prediction as in flight (drain waits for it)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, seconds: float) -> None:
        """Take no new work (503, /ready too) and let the predictions in flight finish, for up to `seconds`;
        those still waiting then are answered 503 (the batch the model runs gets CLOSE_GRACE_S more)."""
        self.draining = True
        logger.info("draining: %d predictions in flight, waiting up to %g s", self._in_flight, seconds)
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            logger.warning("%d predictions still in flight after %g s (--drain-seconds); the queued ones are "
                           "answered 503", self._in_flight, seconds)
            if self.batcher is not None:
                await self.batcher.close(CLOSE_GRACE_S)
        logger.info("drained; stopping")

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
    catalogue = getattr(bank, "catalogue", None)  # a bank that loads tasks on first use
    if catalogue is not None:
        catalogue.folder(task)  # 404 unless an adapter folder of that name is there
    elif task not in bank.tasks:
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


def task_kind(info: dict[str, Any]) -> str:
    return info.get("task_type") or SEQUENCE_CLASSIFICATION  # adapters of format 1 are all classification


def to_prediction(answer: dict) -> Any:
    """One answer of the bank as its response model, by the keys its task's kind gives it."""
    if "value" in answer:
        return RegressionPrediction(value=answer["value"])
    if "embedding" in answer:
        return EmbeddingPrediction(embedding=answer["embedding"], tokens=answer["tokens"])
    if "entities" in answer:
        return EntitiesPrediction(entities=answer["entities"])
    return ClassPrediction(label=answer["label"], score=answer["score"], scores=answer["scores"],
                           labels=answer.get("labels"))


def to_response(task: str, answers: list[dict]) -> PredictResponse:
    return PredictResponse(task=task, predictions=[to_prediction(a) for a in answers])


@dataclass
class Observed:
    """What a request's metrics record: the task, once it is known to be loaded, and when it came."""

    task: str = UNKNOWN_TASK
    started: float = field(default_factory=time.perf_counter)


@contextlib.asynccontextmanager
async def observed(service: Service, route: str) -> AsyncIterator[Observed]:
    """Count the request as in flight and record its route, task, status and latency when it ends."""
    record, status = Observed(), 500
    try:
        with service.in_flight():
            yield record
        status = 200
    except asyncio.CancelledError:
        status = HTTP_STATUS[ClientDisconnectedError]  # the client went away (its rows have left the queue)
        raise
    except Exception as exc:
        status = http_status(exc)  # 500 for an error the service does not answer on purpose
        raise
    finally:
        service.metrics.observe_request(record.task, status, time.perf_counter() - record.started, route=route)


def check_pairs_allowed(info: dict[str, Any]) -> None:
    if task_kind(info) == TOKEN_CLASSIFICATION:
        raise InputError(f"task {info['name']!r} is a token-classification task: it takes single texts, "
                         f"not [text, text_pair] pairs")


async def model_answers(service: Service, bank: Any, task: str, inputs: list[ModelInput], started: float,
                        truncate: bool = True) -> list[dict]:
    """The bank's answers for `inputs` of `task`, through the batcher (so that they share model calls with
    every other request); 413 first when `truncate` is false and an input is over the max length."""
    if not truncate:
        check_lengths(await asyncio.to_thread(service.token_counts, inputs), bank.max_length)
    try:
        return await service.batcher.submit(task, inputs, remaining(service, started))
    except RequestTimeoutError:
        raise timed_out(service.settings.request_timeout) from None
    except (InputError, WrongTaskKindError):  # the kind kept may be stale (replaced outside the admin routes):
        service.forget_task(task)  # the next request checks fresh info before the model runs
        raise


async def predict(service: Service, request: PredictRequest) -> PredictResponse:
    """Check the request, queue it for the batcher, shape the answers; records the request's metrics.

    The request timeout runs from here: checking lengths counts, queueing and the model the rest.
    """
    async with observed(service, "/v1/predict") as record:
        bank = service.ready_bank()
        inputs = model_inputs(request)
        check_input_count(inputs, service.settings.max_inputs)
        check_task(bank, request.task)
        record.task = request.task
        if any(not isinstance(x, str) for x in inputs):
            await service.task_info(bank, request.task, check_pairs_allowed)
        answers = await model_answers(service, bank, request.task, inputs, record.started, request.truncate)
        return to_response(request.task, answers)


def remaining(service: Service, started: float) -> float:
    """Seconds left of the request timeout for a request that came at `started`; 504 if none."""
    left = started + service.settings.request_timeout - time.perf_counter()
    if left <= 0:
        raise timed_out(service.settings.request_timeout)
    return left


def timed_out(timeout: float) -> RequestTimeoutError:
    return RequestTimeoutError(f"the prediction did not finish within {timeout:g} s (--request-timeout; server "
                               f"overloaded?); retry later")


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


def task_list(bank: Any) -> TaskList:
    """The held tasks; for a bank that loads tasks on first use, also the folders only on disk and the pins."""
    if getattr(bank, "limited", False):  # Ray replicas holding some tasks each: what the answering one holds
        names, pinned = bank.catalog_view()
        return held_list([TaskInfo.model_validate(info) for info in bank.held_task_infos()], names, pinned)
    catalogue = getattr(bank, "catalogue", None)
    if catalogue is None:
        return TaskList(tasks=task_infos(bank))
    if hasattr(bank, "held_task_infos"):  # one call, loading nothing: a task evicted meanwhile is listed on disk
        infos = [TaskInfo.model_validate(info) for info in bank.held_task_infos()]
    else:
        infos = task_infos(bank)
    return held_list(infos, catalogue.names(), (bank.residency_stats() or {}).get("pinned", []))


def held_list(infos: list[TaskInfo], names: list[str], pinned: list[str]) -> TaskList:
    held = {info.name for info in infos}
    return TaskList(tasks=infos, on_disk=[n for n in names if n not in held], pinned=pinned)


class ModelWatch:
    """Relays what a SupervisedBank's monitor thread sees to the service: metrics, and the queue on its loop."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop) -> None:
        self._service, self._loop = service, loop

    def model_hung(self, detail: str) -> None:
        self._service.metrics.model_hangs.inc()

    def model_down(self, detail: str) -> None:
        self._service.metrics.observe_crash()
        self._on_loop(ModelRestartingError(f"{detail}; retry in a moment"))

    def model_up(self, recovery_s: float) -> None:
        self._service.metrics.observe_recovery(recovery_s)

    def model_failed(self, detail: str) -> None:
        self._service.metrics.observe_crash()
        self._on_loop(ModelFailedError(detail))

    def _on_loop(self, error: Exception) -> None:
        try:
            self._loop.call_soon_threadsafe(self._service.model_down, error)
        except RuntimeError:  # the loop has closed: the server is stopping anyway
            pass
