"""Task data in memory: definitions, examples, deterministic splits, file reading, tokenized datasets.

Every loader in `training.tasks` ends in the same shape, a `TaskData`: a `TaskDefinition` and a dict
of splits ("train", "validation", "test", and "test_mismatched" for MNLI), each a list of `Example`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from increlora.errors import IncreLoraError

SINGLE_LABEL = "single_label_classification"
REGRESSION = "regression"


class DataError(IncreLoraError, ValueError):
    """A task's data is missing, malformed, or inconsistent with its definition."""


@dataclass(frozen=True)
class TaskDefinition:
    """What a task is: its inputs, labels, metrics and how its splits are made."""

    name: str
    text_fields: tuple[str, ...]
    """Names of the input text columns: one (single text) or two (a pair)."""
    label_names: tuple[str, ...] = ()
    """Class names; the index is the label id. Empty for regression."""
    problem_type: str = SINGLE_LABEL
    """"single_label_classification" or "regression" (as in transformers' config.problem_type)."""
    metrics: tuple[str, ...] = ("accuracy",)
    """Metrics reported by `training.metrics.compute_metrics`."""
    main_metric: str = "accuracy"
    """The metric that selects the best checkpoint: one of `metrics`, or "combined" (their mean)."""
    split_seed: int = 0
    """Seed of the deterministic split."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/validation/test fractions of the rows that are split here (see `source`)."""
    source: str = "local"
    """"glue": train.tsv split into train/validation by `split_fractions[:2]`, dev.tsv is the test split.
    "wheel": one pinned file split into train/validation/test by `split_fractions`. "local": user files."""
    test_splits: tuple[str, ...] = ("test",)
    """Names of the held-out splits to report (MNLI has a matched and a mismatched one)."""
    label_range: tuple[float, float] | None = None
    """Allowed label interval for regression."""
    description: str = ""
    task_type: str = "sequence-classification"
    """The kind of task (`training.kinds`): "sequence-classification", "embedding" or "token-classification"."""

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.label_names)}


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    text_pair: str | None
    label: int | float
    group: str | None = None
    """Rerankers: the query's id, so ranking metrics compare the documents of one query."""
    negative: str | None = None
    """Embedding pairs: a hard negative for the anchor (text), beside the positive (text_pair)."""


@dataclass
class TaskData:
    definition: TaskDefinition
    splits: dict[str, list[Example]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}

    def label_counts(self, split: str) -> dict[int | float, int]:
        return dict(sorted(Counter(e.label for e in self.splits[split]).items()))


def check_splits(data: TaskData) -> TaskData:
    """Raise DataError when a split is empty; return the data unchanged otherwise."""
    for name, rows in data.splits.items():
        if not rows:
            raise DataError(f"task {data.definition.name!r}: split {name!r} is empty; check the input files "
                            f"or the split fractions {data.definition.split_fractions}")
    return data


# ---------------------------------------------------------------------------------------------------
# deterministic splits


def _rank(key: str, seed: int) -> str:
    # A hash, not a PRNG: the order depends on nothing but the seed and the key (no library version).
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def grouped_split(group_keys: Sequence[str], strata: Sequence[object] | None, fractions: Sequence[float],
                  seed: int) -> list[int]:
    """Assign each row a part index (0, 1, 2, ...) so that rows with the same group key share a part.

    Within each stratum (by default one), groups are ordered by a seeded hash of their key and filled
    into the parts in order until each part holds its fraction of the stratum's rows.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions {tuple(fractions)} must sum to 1")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(group_keys):
        groups[k].append(i)
    by_stratum: dict[object, list[str]] = defaultdict(list)
    for k, rows in groups.items():
        by_stratum[None if strata is None else strata[rows[0]]].append(k)
    bounds = [sum(fractions[: j + 1]) for j in range(len(fractions))]  # cumulative shares, rounded per stratum
    part = [0] * len(group_keys)
    for keys in by_stratum.values():
        total = sum(len(groups[k]) for k in keys)
        ends = [int(b * total + 0.5) for b in bounds]
        seen = 0
        for k in sorted(keys, key=lambda k: _rank(k, seed)):
            # the first part that is not yet full when this group starts
            j = next((j for j, end in enumerate(ends) if seen < end), len(ends) - 1)
            for i in groups[k]:
                part[i] = j
            seen += len(groups[k])
    return part


def split_rows(rows: Sequence[Example], parts: Sequence[int], names: Sequence[str]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {n: [] for n in names}
    for row, j in zip(rows, parts):
        out[names[j]].append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# reading files: each row comes with "file:line" so errors can point at it


@dataclass(frozen=True)
class Row:
    values: dict[str, object]
    where: str  # "path:line"


def read_table(path: str | Path) -> Iterator[Row]:
    """Rows of a .csv, .tsv or .jsonl/.json-lines file with a header (or keys), as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            yield Row(obj, f"{path}:{n}")


def _read_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: the file is empty; it needs a header row and data rows") from None
        except csv.Error as e:
            raise DataError(f"{path}:1: unparseable header ({e})") from e
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: unparseable row ({e})") from e
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}:{reader.line_num}: unparseable row: {len(fields)} fields, the header has "
                                f"{len(header)} ({', '.join(header)}); quote fields that contain {delimiter!r}")
            yield Row(dict(zip(header, fields)), f"{path}:{reader.line_num}")


def require_columns(row: Row, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in row.values]
    if missing:
        raise DataError(f"{row.where}: missing column(s) {missing}; columns present: {sorted(map(str, row.values))}")


def text_value(row: Row, column: str) -> str:
    value = row.values[column]
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{row.where}: column {column!r} must hold text, got {value!r}")
    return str(value)


# ---------------------------------------------------------------------------------------------------
# tokenized datasets


def cut_to_tokens(tokenizer, texts: list[str], max_length: int) -> list[str]:
    """Each text cut after its first max_length tokens (by the tokenizer's character offsets).

    A pair keeps at most max_length tokens of either side, so the pair's tokens do not change; but
    the tokenizer's longest-first truncation of a pair keeps every overflowing piece, which costs
    memory quadratic in a side's length (a reranker's long documents) unless the sides come cut.
    """
    if not getattr(tokenizer, "is_fast", False):
        return texts
    # The tokenizer reads a whole text even when it truncates: read the first 16 characters a token first. That
    # cut stands when a word starts after a whitespace between the last kept token and the end of the part read
    # (the words before it tokenize alone); other texts, and those with fewer tokens, are read whole.
    head = 16 * max_length
    cut = _cut(tokenizer, [t[:head] for t in texts], max_length)
    again = [i for i, (t, (end, n)) in enumerate(zip(texts, cut))
             if len(t) > head and (n < max_length or not re.search(r"\s\S", t[end:head]))]
    for i, whole in zip(again, _cut(tokenizer, [texts[i] for i in again], max_length)):
        cut[i] = whole
    return [t[:end] if n else t for t, (end, n) in zip(texts, cut)]


def _cut(tokenizer, texts: list[str], max_length: int) -> list[tuple[int, int]]:
    """(end of the last of the first max_length tokens, their number) for each text."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length,
                    return_offsets_mapping=True)
    return [(offsets[-1][1] if offsets else 0, len(offsets)) for offsets in enc["offset_mapping"]]


class ItemsDataset(torch.utils.data.Dataset):
    """Items already tokenized, one dict each, as a kind's collator takes them."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class TokenizedDataset(torch.utils.data.Dataset):
    """Items are dicts of unpadded token lists and a label, ready for `DataCollatorWithPadding`."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int | float]):
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def to_torch_dataset(examples: Sequence[Example], tokenizer, max_length: int, chunk: int = 2048) -> TokenizedDataset:
    """Tokenize `examples` (truncating to `max_length` tokens, no padding) into a torch Dataset."""
    keep = ("input_ids", "attention_mask", "token_type_ids")
    encodings: dict[str, list[list[int]]] = {}
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        texts = [e.text for e in part]
        pairs = [e.text_pair for e in part] if part and part[0].text_pair is not None else None
        if pairs is not None:
            texts, pairs = cut_to_tokens(tokenizer, texts, max_length), cut_to_tokens(tokenizer, pairs, max_length)
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        for k in keep:
            if k in enc:
                encodings.setdefault(k, []).extend(enc[k])
    return TokenizedDataset(encodings, [e.label for e in examples])
