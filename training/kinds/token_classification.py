"""Token classification (NER): one IOB2 tag per word; the model tags every sub-token, the loss and
the metrics use a word's first sub-token only (-100 on the rest, as transformers' examples do).

Data: JSONL rows with `tokens` and `tags` (lists of strings), or CoNLL files (one word per line, the
tag in the last column, a blank line between sentences, `-DOCSTART-` lines skipped). IOB1 tags (the
original CoNLL-2003 files) are rewritten as IOB2. The tag set is "O", then B-/I- of each entity type
of the training file in sorted order. Metric: entity-level precision/recall/F1 by `seqeval` (the
CoNLL definition).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from increlora import IncreLoraConfig

from ..data import (
    SINGLE_LABEL,
    DataError,
    ItemsDataset,
    TaskData,
    TaskDefinition,
    check_splits,
    grouped_split,
    read_table,
    split_rows,
)

HEAD_LR_SCALE = 10.0  # the head learns at 10x the adapters' rate (BENCHMARKS.md)
TASK_TYPE = "token-classification"
LOCAL_FILES = "JSONL rows with tokens and tags, or CoNLL (a word per line, its tag last)"
IGNORE = -100
METRICS = ("f1", "precision", "recall")
CONLL_SUFFIXES = (".conll", ".txt", ".bio", ".iob")


@dataclass(frozen=True)
class TokenExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]  # IOB2


# ---------------------------------------------------------------------------------------------------
# tags


def to_iob2(tags: Sequence[str], where: str) -> tuple[str, ...]:
    """IOB1 or IOB2 tags as IOB2: an I-X that does not continue an X entity starts one (B-X)."""
    out = []
    for i, tag in enumerate(tags):
        if tag != "O" and (len(tag) < 3 or tag[:2] not in ("B-", "I-")):
            raise DataError(f"{where}: tag {tag!r} is not IOB ('O', 'B-TYPE' or 'I-TYPE')")
        if tag.startswith("I-") and (i == 0 or out[-1] == "O" or out[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
    return tuple(out)


def tag_set(rows: Sequence[TokenExample]) -> tuple[str, ...]:
    types = sorted({t[2:] for e in rows for t in e.tags if t != "O"})
    return ("O", *(f"{p}-{t}" for t in types for p in "BI"))


def definition(name: str, labels: Sequence[str], **kw) -> TaskDefinition:
    return TaskDefinition(name=name, text_fields=("tokens",), label_names=tuple(labels), problem_type=SINGLE_LABEL,
                          metrics=METRICS, main_metric="f1", task_type=TASK_TYPE, **kw)


def check_tags(d: TaskDefinition, splits: dict[str, list[TokenExample]]) -> None:
    known = set(d.label_names)
    for split, rows in splits.items():
        for e in rows:
            unknown = sorted(set(e.tags) - known)
            if unknown:
                raise DataError(f"task {d.name!r}: split {split!r} has tag(s) {unknown} that are not in the "
                                f"training file's tag set {list(d.label_names)}")


# ---------------------------------------------------------------------------------------------------
# files


def read_conll(path: str | Path) -> list[TokenExample]:
    """Sentences of a CoNLL file: word first, tag last, whitespace- or tab-separated columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    out, tokens, tags, start = [], [], [], 1

    def flush():
        if tokens:
            out.append(TokenExample(tuple(tokens), to_iob2(tags, f"{path}:{start}")))
        tokens.clear()
        tags.clear()

    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [x.strip() for x in fields]
            if not any(fields) or fields[0] == "-DOCSTART-":
                flush()
                start = n + 1
                continue
            if len(fields) < 2 or not fields[0] or not fields[-1]:
                raise DataError(f"{path}:{n}: expected 'word ... tag' (two or more columns), got {line.strip()!r}")
            tokens.append(fields[0])
            tags.append(fields[-1])
    flush()
    if not out:
        raise DataError(f"{path}: no sentences")
    return out


def read_jsonl(path: str | Path) -> list[TokenExample]:
    out = []
    for r in read_table(path):
        tokens, tags = r.values.get("tokens"), r.values.get("tags")
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{r.where}: each row needs `tokens` and `tags`, two lists of strings")
        if not tokens or len(tokens) != len(tags):
            raise DataError(f"{r.where}: {len(tokens)} tokens and {len(tags)} tags; one tag per token, at least one")
        if not all(isinstance(x, str) and x for x in tokens) or not all(isinstance(x, str) for x in tags):
            raise DataError(f"{r.where}: tokens must be non-empty strings and tags strings like 'B-PER'")
        out.append(TokenExample(tuple(tokens), to_iob2(tags, r.where)))
    if not out:
        raise DataError(f"{path}: no data rows")
    return out


def read_file(path: str | Path) -> list[TokenExample]:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if suffix in CONLL_SUFFIXES or suffix.startswith(".test") or suffix == ".train":
        return read_conll(path)
    raise DataError(f"{path}: a token-classification file is .jsonl (tokens, tags) or CoNLL "
                    f"({', '.join(CONLL_SUFFIXES)}, eng.train/eng.testa/eng.testb)")


def split_sentences(d: TaskDefinition, rows: list[TokenExample]) -> dict[str, list[TokenExample]]:
    """Deterministic split by sentence; identical sentences stay together."""
    parts = grouped_split([" ".join(e.tokens) for e in rows], None, d.split_fractions, d.split_seed)
    return split_rows(rows, parts, ("train", "validation", "test"))


def load_local(name: str, train, validation=None, test=None, split_seed: int = 42, **_) -> TaskData:
    rows = read_file(train)
    d = definition(name, tag_set(rows), split_seed=split_seed, source="local",
                   split_fractions=(0.9, 0.1, 0.0) if validation is None else (1.0, 0.0, 0.0),
                   test_splits=("test",) if test is not None else ())
    if validation is None:
        splits = split_sentences(d, rows)
        del splits["test"]
    else:
        splits = {"train": rows, "validation": read_file(validation)}
    if test is not None:
        splits["test"] = read_file(test)
    check_tags(d, splits)
    return check_splits(TaskData(d, splits))


# CoNLL-2003 as distributed: eng.train / eng.testa / eng.testb, or train.txt / valid.txt / test.txt
CONLL_LAYOUTS = ({"train": "eng.train", "validation": "eng.testa", "test": "eng.testb"},
                 {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"})


def load_conll_dir(d: TaskDefinition, folder: Path) -> TaskData:
    for layout in CONLL_LAYOUTS:
        files = {s: folder / f for s, f in layout.items()}
        if all(p.is_file() for p in files.values()):
            splits = {s: read_conll(p) for s, p in files.items()}
            check_tags(d, splits)
            return TaskData(d, splits)
    names = " or ".join("/".join(lay.values()) for lay in CONLL_LAYOUTS)
    raise DataError(f"task {d.name!r}: {folder} does not hold the CoNLL-2003 files ({names}); pass the folder "
                    f"with --conll-dir")


# ---------------------------------------------------------------------------------------------------
# the kind's interface (see training.kinds)


def load_model(path: str, d: TaskDefinition):
    return AutoModelForTokenClassification.from_pretrained(path, num_labels=d.num_labels, id2label=d.id2label,
                                                           label2id=d.label2id)


def adjust_config(config: IncreLoraConfig) -> IncreLoraConfig:
    return config


def align_labels(word_ids: Sequence[int | None], tag_ids: Sequence[int]) -> list[int]:
    """A word's tag on its first sub-token, IGNORE on special tokens and later sub-tokens."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else tag_ids[w])
        previous = w
    return out


def to_dataset(d: TaskDefinition, rows: Sequence[TokenExample], tokenizer, max_length: int) -> ItemsDataset:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("token classification needs a fast tokenizer (one that maps sub-tokens to words)")
    label2id = d.label2id
    enc = tokenizer([list(e.tokens) for e in rows], is_split_into_words=True, truncation=True, max_length=max_length)
    items = []
    for i, e in enumerate(rows):
        item = {k: v[i] for k, v in enc.items()}
        item["labels"] = align_labels(enc.word_ids(i), [label2id[t] for t in e.tags])
        items.append(item)
    return ItemsDataset(items)


def collator(tokenizer):
    return DataCollatorForTokenClassification(tokenizer)


def compute_metrics(d: TaskDefinition, predictions, labels, rows=None) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    pred = np.asarray(predictions)
    pred = pred.argmax(-1) if pred.ndim == 3 else pred
    labels = np.asarray(labels)
    y_true, y_pred = [], []
    for p_row, l_row in zip(pred, labels):
        keep = l_row != IGNORE
        y_true.append([d.label_names[i] for i in l_row[keep]])
        y_pred.append([d.label_names[i] for i in p_row[keep]])
    if not any(y_true):
        raise DataError("no tagged words to score")
    out = {"f1": f1_score(y_true, y_pred, zero_division=0),
           "precision": precision_score(y_true, y_pred, zero_division=0),
           "recall": recall_score(y_true, y_pred, zero_division=0)}
    out = {m: float(out[m]) for m in d.metrics}
    out["combined"] = float(np.mean(list(out.values())))
    out["main"] = out[d.main_metric]
    return out


def check_train(d: TaskDefinition, rows) -> None:
    if not any(t != "O" for e in rows for t in e.tags):
        raise DataError(f"task {d.name!r}: the training sentences hold no entity; raise --max-train-examples")


def adapter_fields(d: TaskDefinition, model_path: str) -> dict:
    return {"task_type": TASK_TYPE, "labels": list(d.label_names), "problem_type": SINGLE_LABEL,
            "label_all_tokens": False}
