"""Request and response bodies of the HTTP service (they make its OpenAPI schema)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr


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


class PredictResponse(BaseModel):
    task: str
    predictions: list[ClassPrediction | RegressionPrediction] = Field(description="One per input, in order.")


class TaskInfo(BaseModel):
    name: str
    labels: list[str]
    problem_type: str = Field(description="single_label_classification, multi_label_classification or regression.")
    total_rank: int = Field(description="Sum of the adapter's ranks over its adapted modules.")
    parameter_count: int = Field(description="Parameters of the adapter (low-rank factors and saved head).")
    base_model: str
    num_labels: int | None = None
    memory_bytes: int | None = Field(None, description="Memory the adapter takes in the bank.")


class TaskList(BaseModel):
    tasks: list[TaskInfo] = Field(description="The tasks the bank holds now.")
    on_disk: list[str] | None = Field(
        None, description="A server with --max-resident: adapter folders not held, loaded on their first request.")
    pinned: list[str] | None = Field(None, description="A server with --max-resident: tasks never evicted.")


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
    """"failed" (503) once the model process crashed too often and is no longer restarted: replace the server."""

    status: Literal["ok", "failed"] = "ok"
    detail: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "loading", "restarting", "draining", "failed"]
    tasks: int = 0
    detail: str | None = None


class ErrorBody(BaseModel):
    """Body of every error answer but 422 (which lists the invalid fields as FastAPI does)."""

    detail: str
    known_tasks: list[str] | None = None


class ValidationErrorBody(BaseModel):
    """Body of a 422 for an invalid request: FastAPI's list of invalid fields."""

    detail: list[dict[str, Any]]
