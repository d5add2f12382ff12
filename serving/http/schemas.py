"""Request and response bodies of the HTTP service (they make its OpenAPI schema)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator


def _check_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes such as "\ud800"
        raise ValueError(f"not valid Unicode ({exc.reason})") from None
    return text


_BLANKS = " \t\n\r\f\v"  # ASCII whitespace: the same set in Python, JSON Schema (ECMA) and Rust regexes


def _check_text(text: str) -> str:
    if not text.strip(_BLANKS):
        raise ValueError("text must not be empty or only whitespace")
    return _check_unicode(text)


Name = Annotated[StrictStr, AfterValidator(_check_unicode)]
Text = Annotated[StrictStr, Field(min_length=1, description="A text, not empty nor only whitespace.",
                                  json_schema_extra={"pattern": "[^ \\t\\n\\r\\f\\v]"}),
                 AfterValidator(_check_text)]
TextPair = Annotated[tuple[Text, Text], Field(description="A (text, text_pair) pair, for two-sentence tasks.")]
Input = Text | TextPair


class PredictRequest(BaseModel):
    """Inputs for one task. A pair is a two-item list; a single pair is sent as `[["a", "b"]]`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"task": "sst2", "inputs": ["a gripping film", "a dull plot"]},
        {"task": "mrpc", "inputs": [["he won the vote", "the vote was won by him"]], "truncate": True},
    ]})

    task: Name = Field(min_length=1, max_length=256, description="Name of a loaded task (see GET /v1/tasks).")
    inputs: Text | Annotated[list[Input], Field(min_length=1)] = Field(
        description="One text, or a list of texts and [text, text_pair] pairs. Answers come in this order.")
    truncate: StrictBool = Field(
        True, description="Cut inputs longer than the model's max length; false answers 413 for them instead.")


class ClassPrediction(BaseModel):
    """Answer of a classification task: the arg-max label, its probability and every label's probability."""

    label: str
    score: float
    scores: dict[str, float]
    labels: list[str] | None = Field(None, description="Multi-label tasks only: labels with probability >= 0.5.")


class RegressionPrediction(BaseModel):
    """Answer of a regression task (a list when the head has several outputs)."""

    value: float | list[float]


class EmbeddingPrediction(BaseModel):
    """Answer of an embedding task: the pooled vector (L2-normalised when the task's pooling says so)."""

    embedding: list[float]
    tokens: int = Field(description="Tokens the model read, special tokens included.")


class Entity(BaseModel):
    entity_group: str = Field(description="The entity's type: its words' tag without the B-/I- prefix.")
    score: float = Field(description="Mean over its words of the probability of each word's tag.")
    word: str = Field(description="The entity's text: the input's characters [start, end).")
    start: int
    end: int


class EntitiesPrediction(BaseModel):
    """Answer of a token-classification task: the entities found, in text order."""

    entities: list[Entity]


class PredictResponse(BaseModel):
    task: str
    predictions: list[ClassPrediction | RegressionPrediction | EmbeddingPrediction | EntitiesPrediction] = Field(
        description="One per input, in order, shaped by the task's kind (see GET /v1/tasks/{task}).")


# --- /v1/embeddings, in OpenAI's shape ------------------------------------------------------------

class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; `model` names an embedding task."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "news_search", "input": ["a gripping film", "markets fell"], "encoding_format": "float"}]})

    model: Name = Field(min_length=1, max_length=256, description="Name of a loaded embedding task.")
    input: Text | Annotated[list[Text], Field(min_length=1)] = Field(
        description="One text or a list of texts (not token ids). Embeddings come in this order.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as base64 of its little-endian float32 bytes.")
    dimensions: int | None = Field(
        None, ge=1, description="Accepted only when equal to the task's dimension: vectors are not shortened.")
    user: StrictStr | None = Field(None, description="Accepted for compatibility; unused.")
    truncate: StrictBool = Field(
        True, description="Cut inputs longer than the model's max length; false answers 413 for them instead.")

    @model_validator(mode="before")
    @classmethod
    def _no_token_ids(cls, data: Any) -> Any:
        given = data.get("input") if isinstance(data, dict) else None
        items = given if isinstance(given, list) else [given]
        if any(_is_token_ids(x) for x in items):
            raise ValueError("input: token-id arrays are not supported; send the texts (a string or a list of strings)")
        return data


def _is_token_ids(x: Any) -> bool:
    if isinstance(x, list):
        return bool(x) and all(_is_token_ids(y) for y in x)
    return isinstance(x, int) and not isinstance(x, bool)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="Position of the input in the request.")
    embedding: list[float] | str = Field(description="The vector: floats, or a base64 string (encoding_format).")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model read over all inputs, special tokens included.")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingsUsage


# --- /v1/rerank, in Cohere's and Jina's shape -----------------------------------------------------

class RerankDocument(BaseModel):
    """A document as an object: `text` is ranked; other fields come back as given (return_documents)."""

    model_config = ConfigDict(extra="allow")

    text: Text


class RerankRequest(BaseModel):
    """Cohere's and Jina's rerank request; `model` names a reranker: a classification task over
    (query, document) pairs with one output (its score, through a sigmoid) or two labels (label 1 = relevant)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "news_rerank", "query": "stock markets", "documents": ["shares fell", "the cup final"],
         "top_n": 1, "return_documents": True}]})

    model: Name = Field(min_length=1, max_length=256, description="Name of a loaded reranking task.")
    query: Text
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1)] = Field(
        description="Texts, or objects with a \"text\" field.")
    top_n: int | None = Field(None, ge=1, description="Answer only the best top_n documents (default: all).")
    return_documents: StrictBool = Field(False, description="Put each document in its result.")
    truncate: StrictBool = Field(
        True, description="Cut pairs longer than the model's max length; false answers 413 for them instead.")


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Between 0 and 1; higher is more relevant.")
    document: RerankDocument | None = Field(None, description="With return_documents only.")


class RerankUsage(BaseModel):
    total_tokens: int = Field(description="Tokens the model read over all (query, document) pairs.")


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult] = Field(description="Best first.")
    usage: RerankUsage


# --- tasks ----------------------------------------------------------------------------------------

class TaskInfo(BaseModel):
    name: str
    task_type: str = Field("sequence-classification",
                           description="sequence-classification, embedding or token-classification.")
    labels: list[str]
    problem_type: str | None = Field(
        None, description="single_label_classification, multi_label_classification or regression; null for embedding.")
    total_rank: int = Field(description="Sum of the adapter's ranks over its adapted modules.")
    parameter_count: int = Field(description="Parameters of the adapter (low-rank factors and saved head).")
    base_model: str
    num_labels: int | None = None
    memory_bytes: int | None = Field(None, description="Memory the adapter takes in the bank.")
    pooling: dict[str, Any] | None = Field(None, description="Embedding tasks: {\"mode\": mean|cls, \"normalize\"}.")
    dimensions: int | None = Field(None, description="Embedding tasks: the length of their vectors.")


class TaskList(BaseModel):
    tasks: list[TaskInfo] = Field(description="The tasks the bank holds now. On Ray with a per-replica limit: the "
                                              "tasks held by the one replica that answered (each holds its own).")
    on_disk: list[str] | None = Field(
        None, description="A server with --max-resident: adapter folders not held, loaded on their first request "
                          "(on Ray: the catalog's tasks that replica does not hold).")
    pinned: list[str] | None = Field(None, description="A server with --max-resident: tasks never evicted (on Ray: "
                                                       "the catalog's pins, loaded by each replica at its next call).")


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[StrictStr] = Field(min_length=1, max_length=1000,
                                   description="Names of adapter folders to load now and never evict.")


class Pins(BaseModel):
    pinned: list[str] = Field(description="Every task pinned now.")


class LoadTaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$",
                            description="Name of an adapter folder inside the server's adapter folder: letters, "
                                        "digits, '.', '_', '-', not starting with '.' (a name, never a path).")


class RemovedTask(BaseModel):
    removed: str


class Health(BaseModel):
    """"failed" (503) once the model process crashed too often and is no longer restarted: replace the server.
    `model`, under supervision: "restarting" after a crash or a hang (killed), with the reason in `detail`."""

    status: Literal["ok", "failed"] = "ok"
    model: Literal["up", "restarting", "failed", "closed"] | None = None
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "loading", "restarting", "draining", "failed"]
    tasks: int = 0
    detail: str | None = None


class ErrorBody(BaseModel):
    """Body of every error answer but 422 (which lists the invalid fields as FastAPI does)."""

    detail: str
    known_tasks: list[str] | None = None
    error: OpenAIError | None = None


class OpenAIError(BaseModel):
    """On /v1/embeddings, errors also come in OpenAI's shape, whose message OpenAI's clients show."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ValidationErrorBody(BaseModel):
    """Body of a 422 for an invalid request: FastAPI's list of invalid fields."""

    detail: list[dict[str, Any]]
    error: OpenAIError | None = None
