"""The work behind /v1/embeddings (OpenAI's shape) and /v1/rerank (Cohere's and Jina's shape).

Both queue their rows on the same batcher as /v1/predict, so one model call serves requests of every
route. An embedding task answers embeddings; a reranker is a sequence-classification task over
(query, document) pairs with one output (a score, through a sigmoid) or two labels (label 1 = relevant).
"""
from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from increlora.adapter_file import EMBEDDING

from ..bank.errors import WrongTaskKindError
from ..bank.kinds import check_reranker, rerank_results
from .errors import DimensionsError
from .schemas import (
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from .service import (
    Service,
    answered_kind,
    check_input_count,
    check_lengths,
    check_task,
    model_answers,
    observed,
    task_kind,
)

OPENAI_ROUTES = ("/v1/embeddings",)


def openai_error(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An error body, with OpenAI's {"error": {...}} beside "detail" on OpenAI's routes: its clients show that
    message (and only "Error code: 422" without it)."""
    if path not in OPENAI_ROUTES:
        return body
    detail = body.get("detail")
    message = detail if isinstance(detail, str) else "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in detail or ())
    return {**body, "error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                              "param": None, "code": None}}


async def embeddings(service: Service, request: EmbeddingsRequest) -> EmbeddingsResponse:
    async with observed(service, "/v1/embeddings") as record:
        bank = service.ready_bank()
        texts = [request.input] if isinstance(request.input, str) else list(request.input)
        check_input_count(texts, service.settings.max_inputs)
        check_task(bank, request.model)
        record.task = request.model
        info = await service.task_info(bank, request.model, check_embedding)
        if request.dimensions is not None and request.dimensions != info.get("dimensions"):
            raise DimensionsError(f"task {request.model!r} gives vectors of {info.get('dimensions')} dimensions; "
                                  f"it cannot give {request.dimensions} (leave out \"dimensions\")")
        answers = await model_answers(service, bank, request.model, texts, record.started, request.truncate)
        if any("embedding" not in a for a in answers):
            raise replaced(service, request.model, answers, "/v1/embeddings serves embedding tasks")
        encode = encode_base64 if request.encoding_format == "base64" else list
        data = [EmbeddingData(index=i, embedding=encode(a["embedding"])) for i, a in enumerate(answers)]
        tokens = sum(a["tokens"] for a in answers)
        return EmbeddingsResponse(data=data, model=request.model,
                                  usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))


def check_embedding(info: dict[str, Any]) -> None:
    if task_kind(info) != EMBEDDING:
        raise WrongTaskKindError(info["name"], task_kind(info), "/v1/embeddings serves embedding tasks "
                                 "(POST /v1/predict answers every kind)")


def encode_base64(vector: list[float]) -> str:
    """The vector as OpenAI's clients decode it: base64 of little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def rerank(service: Service, request: RerankRequest, route: str = "/v1/rerank") -> RerankResponse:
    async with observed(service, route) as record:
        bank = service.ready_bank()
        documents = [RerankDocument(text=d) if isinstance(d, str) else d for d in request.documents]
        check_input_count(documents, service.settings.max_inputs)
        check_task(bank, request.model)
        record.task = request.model
        await service.task_info(bank, request.model, check_reranker)
        pairs = [(request.query, d.text) for d in documents]
        counts = await asyncio.to_thread(service.token_counts, pairs)
        if not request.truncate:
            check_lengths(counts, bank.max_length)
        answers = await model_answers(service, bank, request.model, pairs, record.started)
        if not all(isinstance(a.get("value"), float | int) or len(a.get("scores") or ()) == 2 for a in answers):
            raise replaced(service, request.model, answers, "/v1/rerank serves rerankers")
        results = [RerankResult(**r, document=documents[r["index"]]) if request.return_documents
                   else RerankResult(**r) for r in rerank_results(answers, request.top_n)]
        return RerankResponse(model=request.model, results=results,
                              usage=RerankUsage(total_tokens=sum(min(n, bank.max_length) for n in counts)))


def replaced(service: Service, task: str, answers: list[dict], wanted: str) -> WrongTaskKindError:
    """The task was replaced by one of another kind since its kind was asked (outside the admin routes):
    forget what was kept about it, and say what it is now."""
    service.forget_task(task)
    return WrongTaskKindError(task, answered_kind(answers[0]), wanted)
