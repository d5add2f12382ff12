"""The HTTP app: `create_app(bank_or_loader, settings)` builds a FastAPI application (thin routes, see service.py).

    uvicorn-style:  app = create_app(lambda: AdapterBank.load("adapters/"), ServiceSettings(adapters="adapters/"))
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from . import access as http_access
from . import admin as http_admin
from . import retrieval as http_retrieval
from . import service as http_service
from .disconnect import unless_disconnected
from .errors import HTTP_STATUS, error_body, error_headers, http_status
from .limits import BodyGuard
from .metrics import ServiceMetrics
from .schemas import (
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorBody,
    Health,
    LoadTaskRequest,
    PinRequest,
    Pins,
    PredictRequest,
    PredictResponse,
    Readiness,
    RemovedTask,
    RerankRequest,
    RerankResponse,
    TaskInfo,
    TaskList,
    ValidationErrorBody,
)
from .service import Service
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def create_app(bank_or_loader: Any, settings: ServiceSettings | None = None, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app serving `bank_or_loader`: a loaded AdapterBank, or a function returning one (run at start-up,
    off the event loop; /ready answers 503 until it returns). `on_load_error` is called if loading fails."""
    settings = settings or ServiceSettings()
    service = Service(settings, ServiceMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start(bank_or_loader, on_load_error)
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="increlora", version="1", lifespan=lifespan,
                  description="Predictions from many IncreLoRA adapters on one frozen backbone, batched across tasks.")
    app.state.service = service
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes)
    for error_type in HTTP_STATUS:
        app.add_exception_handler(error_type, _error_response)
    app.add_exception_handler(RequestValidationError, _validation_error_response)
    app.include_router(router)
    # with API keys, the prediction and listing routes need one (and the OpenAPI schema says so)
    app.include_router(keyed_router, dependencies=[Depends(require_api_key)] if settings.api_keys else [])
    return app


async def _validation_error_response(request: Request, exc: RequestValidationError) -> Response:
    # json.dumps escapes what it cannot encode (a lone surrogate echoed back would crash the default handler)
    body = json.dumps(http_retrieval.openai_error(request.url.path, 422, {"detail": jsonable_encoder(exc.errors())}))
    return Response(body, status_code=422, media_type="application/json")


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    status = http_status(exc)
    return JSONResponse(http_retrieval.openai_error(request.url.path, status, error_body(exc)), status_code=status,
                        headers=error_headers(exc))


# --- dependencies -------------------------------------------------------------------------------

# Dependencies are `async def`: a plain `def` one would run on the thread pool, a thread hop per request.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_bank(service: ServiceDep) -> Any:
    return service.ready_bank()


BankDep = Annotated[Any, Depends(get_bank)]
_bearer = HTTPBearer(auto_error=False, description="The server's admin token (--admin-token).")
_api_key = HTTPBearer(auto_error=False, scheme_name="APIKey",
                      description="One of the server's API keys (--api-key), when it has any.")


async def require_admin(service: ServiceDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    http_admin.check_admin_token(service.settings, credentials.credentials if credentials else None)


async def require_api_key(service: ServiceDep,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_api_key)]) -> None:
    http_access.check_api_key(service.settings, credentials.credentials if credentials else None)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


_MODEL_ERRORS = {**_errors(401, 404, 413, 500, 503, 504), 422: {
    "model": ErrorBody | ValidationErrorBody,
    "description": "Invalid request body, or a task of another kind than the route serves"}}


# --- routes -------------------------------------------------------------------------------------

router = APIRouter()
keyed_router = APIRouter()  # the routes an API key opens, when the server has any


@router.get("/health", response_model=Health, response_model_exclude_none=True, tags=["service"],
            summary="The process is alive and can recover",
            responses={503: {"model": Health, "description": "The model process crashed too often: replace it"}})
async def health(service: ServiceDep, response: Response) -> Health:
    health = service.health()
    if health.status != "ok":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return health


@router.get("/ready", response_model=Readiness, tags=["service"], summary="Adapters loaded: predictions are served",
            responses={503: {"model": Readiness,
                             "description": "Loading, restarting the model process, shutting down, or failed"}})
async def ready(service: ServiceDep, response: Response) -> Readiness:
    readiness = service.readiness()
    if readiness.status != "ready":
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "1"
    return readiness


@router.get("/metrics", tags=["service"], summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(service: ServiceDep) -> Response:
    # off the event loop: a bank's residency counts come from the model process between batches
    return Response(await asyncio.to_thread(service.metrics.render), media_type=service.metrics.content_type)


@keyed_router.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
                   tags=["predict"], summary="Predict for one task of any kind; requests of any tasks and routes "
                                             "share model calls", responses=_MODEL_ERRORS)
async def predict(body: PredictRequest, service: ServiceDep, request: Request) -> PredictResponse:
    return await unless_disconnected(request, http_service.predict(service, body))


@keyed_router.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["predict"],
                   summary="Embeddings in OpenAI's shape; `model` names an embedding task", responses=_MODEL_ERRORS)
async def embeddings(body: EmbeddingsRequest, service: ServiceDep, request: Request) -> EmbeddingsResponse:
    return await unless_disconnected(request, http_retrieval.embeddings(service, body))


@keyed_router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_unset=True, tags=["predict"],
                   summary="Rerank documents for a query, in Cohere's and Jina's shape; `model` names a reranker",
                   responses=_MODEL_ERRORS)
@keyed_router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_unset=True, tags=["predict"],
                   summary="/v1/rerank at the path of Cohere's v2 client", responses=_MODEL_ERRORS)
async def rerank(body: RerankRequest, service: ServiceDep, request: Request) -> RerankResponse:
    return await unless_disconnected(request, http_retrieval.rerank(service, body, request.scope["route"].path))


@keyed_router.get("/v1/tasks", response_model=TaskList, response_model_exclude_none=True, tags=["tasks"],
                  summary="Loaded tasks", responses=_errors(401, 503))
async def list_tasks(bank: BankDep) -> TaskList:
    # off the event loop: the model process answers task_info between batches
    return await asyncio.to_thread(http_service.task_list, bank)


@keyed_router.get("/v1/tasks/{task}", response_model=TaskInfo, response_model_exclude_none=True, tags=["tasks"],
                  summary="One loaded task", responses=_errors(401, 404, 503))
async def get_task(task: str, bank: BankDep) -> TaskInfo:
    return await asyncio.to_thread(http_service.task_info, bank, task)


@router.post("/v1/tasks", response_model=TaskInfo, status_code=status.HTTP_201_CREATED, tags=["admin"],
             summary="Load an adapter by name from the server's adapter folder (admin)",
             dependencies=[Depends(require_admin)],
             responses={**_errors(400, 401, 403, 404, 409, 503), 422: {
                 "model": ErrorBody | ValidationErrorBody,
                 "description": "Invalid request body, or an adapter folder that cannot be loaded"}})
async def load_task(body: LoadTaskRequest, service: ServiceDep, bank: BankDep) -> TaskInfo:
    info = await asyncio.to_thread(http_admin.load_task, bank, service.settings.adapters, body.name)
    service.forget_task(info.name)
    service.metrics.tasks_loaded.set(len(bank.tasks))
    return info


@router.delete("/v1/tasks/{task}", response_model=RemovedTask, tags=["admin"],
               summary="Unload a task (admin); its queued requests get 404",
               dependencies=[Depends(require_admin)], responses=_errors(401, 403, 404, 503))
async def remove_task(task: str, service: ServiceDep, bank: BankDep) -> RemovedTask:
    removed = await asyncio.to_thread(http_admin.remove_task, bank, task)
    service.forget_task(task)
    service.metrics.tasks_loaded.set(len(bank.tasks))
    return removed


@router.post("/v1/pins", response_model=Pins, tags=["admin"],
             summary="Load tasks now and never evict them (admin; a server with --max-resident)",
             dependencies=[Depends(require_admin)], responses=_errors(401, 403, 404, 409, 413, 500, 503))
async def pin_tasks(body: PinRequest, bank: BankDep) -> Pins:
    return await asyncio.to_thread(http_admin.pin_tasks, bank, body.tasks)


@router.delete("/v1/pins/{task}", response_model=Pins, tags=["admin"],
               summary="Let a pinned task be evicted again (admin)",
               dependencies=[Depends(require_admin)], responses=_errors(401, 403, 409, 503))
async def unpin_task(task: str, bank: BankDep) -> Pins:
    return await asyncio.to_thread(http_admin.unpin_task, bank, task)
