"""The work behind /v1/embeddings (OpenAI's shape) and /v1/rerank (Cohere's and Jina's shape).

Both queue their rows on the same batcher as /v1/predict, so one model call serves requests of every
route. An embedding task answers embeddings; a reranker is a sequence-classification task over
(query, document) pairs with one output (a score, through a sigmoid) or two labels (label 1 = relevant).
"""
from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

from .errors import DimensionsError, WrongTaskKindError
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
    EMBEDDING,
    SEQUENCE_CLASSIFICATION,
    Service,
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
        info = await service.task_info(bank, request.model)
        require_kind(request.model, info, EMBEDDING, "/v1/embeddings", "embedding tasks")
        if request.dimensions is not None and request.dimensions != info.get("dimensions"):
            raise DimensionsError(f"task {request.model!r} gives vectors of {info.get('dimensions')} dimensions; "
                                  f"it cannot give {request.dimensions} (leave out \"dimensions\")")
        answers = await model_answers(service, bank, request.model, texts, record.started, request.truncate)
        if any("embedding" not in a for a in answers):  # the task was replaced by one of another kind meanwhile
            service.forget_task(request.model)
            raise WrongTaskKindError(f"task {request.model!r} is no longer an embedding task; retry")
        encode = encode_base64 if request.encoding_format == "base64" else list
        data = [EmbeddingData(index=i, embedding=encode(a["embedding"])) for i, a in enumerate(answers)]
        tokens = sum(a["tokens"] for a in answers)
        return EmbeddingsResponse(data=data, model=request.model,
                                  usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))


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
        info = await service.task_info(bank, request.model)
        require_reranker(request.model, info)
        pairs = [(request.query, d.text) for d in documents]
        counts = await asyncio.to_thread(service.token_counts, pairs)
        if not request.truncate:
            check_lengths(counts, bank.max_length)
        answers = await model_answers(service, bank, request.model, pairs, record.started)
        try:
            scores = [relevance_score(request.model, a) for a in answers]
        except WrongTaskKindError:  # the task was replaced by one of another kind meanwhile
            service.forget_task(request.model)
            raise
        best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:request.top_n]
        results = [RerankResult(index=i, relevance_score=scores[i], document=documents[i])
                   if request.return_documents else RerankResult(index=i, relevance_score=scores[i]) for i in best]
        return RerankResponse(model=request.model, results=results,
                              usage=RerankUsage(total_tokens=sum(min(n, bank.max_length) for n in counts)))


def require_kind(task: str, info: dict[str, Any], kind: str, route: str, serves: str) -> None:
    if task_kind(info) != kind:
        raise WrongTaskKindError(f"task {task!r} is of kind {task_kind(info)!r}; {route} serves {serves} "
                                 f"(POST /v1/predict answers every kind)")


def require_reranker(task: str, info: dict[str, Any]) -> None:
    require_kind(task, info, SEQUENCE_CLASSIFICATION, "/v1/rerank",
                 "rerankers (sequence-classification tasks over (query, document) pairs)")
    labels = info.get("num_labels") or len(info.get("labels") or []) or 1
    if labels > 2:
        raise WrongTaskKindError(f"task {task!r} is a classification task with {labels} labels; a reranker has one "
                                 f"output (its score) or two labels (label 1 = relevant)")


def relevance_score(task: str, answer: dict) -> float:
    """A reranker's answer as a score in [0, 1]: sigmoid of its one output, or the probability of its last label
    (label 1 of two; the bank gives the scores in label order)."""
    if isinstance(answer.get("value"), float | int):
        return sigmoid(answer["value"])
    scores = list((answer.get("scores") or {}).values())
    if 1 <= len(scores) <= 2:
        return scores[-1]
    raise WrongTaskKindError(f"task {task!r} no longer answers as a reranker; retry")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
