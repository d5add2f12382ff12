"""The task registry: GLUE, the offline real-data tasks, and any local CSV/TSV/JSONL files.

Splits are fixed and deterministic, so every run and every method sees the same examples:

- GLUE test labels are hidden, so the GLUE dev set is our "test" split (MNLI: "test" is dev-matched,
  "test_mismatched" dev-mismatched) and "validation" is 10% of the GLUE train set, carved by a seeded
  hash of the row's position (stratified by label).
- The offline tasks (rotten_tomatoes, sms_spam, bbc_news, and bbc_retrieval / bbc_rerank / wnut16
  of the other kinds) come from pinned PyPI wheels (see `increlora.assets`) and are split 80/10/10
  by a seeded hash; rows that must stay together (same movie, same text) are one group, and groups
  never cross splits.
- conll2003 reads a local folder in the CoNLL-2003 layout (`conll_dir`), as GLUE reads `glue_dir`.

A task's kind (`TaskDefinition.task_type`) decides how its local files are read (`training.kinds`).
"""
from __future__ import annotations

import bz2
import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from increlora.assets import fetch_asset

from . import pair_tasks
from .data import (
    REGRESSION,
    SINGLE_LABEL,
    DataError,
    Example,
    Row,
    TaskData,
    TaskDefinition,
    check_splits,
    grouped_split,
    read_table,
    require_columns,
    split_rows,
    text_value,
)
from .kinds import DEFAULT_TASK_TYPE, embedding, kind_of, token_classification

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
GLUE_SPLIT = (0.9, 0.1, 0.0)  # of GLUE's train set; GLUE dev is the test split
WHEEL_SPLIT = (0.8, 0.1, 0.1)
SEED = 42


WNUT16_TAGS = ("O", *(f"{p}-{t}" for t in ("company", "facility", "geo-loc", "movie", "musicartist", "other",
                                             "person", "product", "sportsteam", "tvshow") for p in "BI"))


def _glue(name, text_fields, label_names=(), metrics=("accuracy",), main="accuracy", **kw) -> TaskDefinition:
    return TaskDefinition(name=name, text_fields=text_fields, label_names=label_names, metrics=metrics,
                          main_metric=main, split_seed=SEED, split_fractions=GLUE_SPLIT, source="glue", **kw)


def _wheel(name, text_fields, label_names, metrics=("accuracy",), main="accuracy", **kw) -> TaskDefinition:
    return TaskDefinition(name=name, text_fields=text_fields, label_names=label_names, metrics=metrics,
                          main_metric=main, split_seed=SEED, split_fractions=WHEEL_SPLIT, source="wheel", **kw)


TASKS: dict[str, TaskDefinition] = {t.name: t for t in (
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "matthews_correlation",
          description="CoLA: grammatical acceptability"),
    _glue("sst2", ("sentence",), ("negative", "positive"), description="SST-2: movie review sentiment"),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "combined",
          description="MRPC: paraphrase"),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "combined",
          description="QQP: duplicate questions"),
    _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "combined", problem_type=REGRESSION,
          label_range=(0.0, 5.0), description="STS-B: semantic similarity score 0-5"),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          test_splits=("test", "test_mismatched"), description="MNLI: entailment, 3 classes"),
    _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), description="QNLI: QA entailment"),
    _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), description="RTE: entailment"),
    _wheel("rotten_tomatoes", ("text",), ("rotten", "fresh"),
           description="Rotten Tomatoes critic snippets (SST-2's source); split by movie"),
    _wheel("sms_spam", ("text",), ("ham", "spam"), ("f1", "accuracy"), "f1",
           description="SMS Spam Collection, exact duplicates removed; f1 of the spam class"),
    _wheel("bbc_news", ("text",), ("business", "entertainment", "politics", "sports", "tech"), ("accuracy", "f1"),
           description="BBC News articles, 5 topics (long texts); f1 is macro"),
    embedding.definition("bbc_retrieval", scored=False, split_seed=SEED, split_fractions=WHEEL_SPLIT, source="wheel",
                         description="BBC News: headline -> rest of the article, against all held-out articles"),
    _wheel("bbc_rerank", ("query", "document"), ("irrelevant", "relevant"), ("mrr@10", "ndcg@10"), "mrr@10",
           description="BBC News: rank an article's text for its headline among 9 others of its topic"),
    token_classification.definition("wnut16", WNUT16_TAGS, split_seed=SEED, split_fractions=WHEEL_SPLIT,
                                    source="wheel", description="WNUT 2016 Twitter NER, 10 entity types"),
    token_classification.definition("conll2003", ("O", *(f"{p}-{t}" for t in ("LOC", "MISC", "ORG", "PER")
                                                         for p in "BI")),
                                    source="conll", description="CoNLL-2003 English NER (local files: conll_dir)"),
)}


def known_tasks() -> list[str]:
    return list(TASKS)


def get_definition(name: str) -> TaskDefinition:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; "
                        f"or pass train=<file> (and validation=...) for a local CSV/TSV/JSONL task")
    return TASKS[key]


def load_task(name: str, glue_dir: str | Path | None = None, cache_dir: str | Path | None = None,
              conll_dir: str | Path | None = None, task_type: str | None = None, **local_kwargs) -> TaskData:
    """Load a task's splits. With `train=...` (see `load_local_task`) `name` is a new local task of
    kind `task_type` (default: sequence classification); a registered task must be of that kind."""
    if local_kwargs:
        kind = kind_of(task_type or DEFAULT_TASK_TYPE)
        if kind.TASK_TYPE == DEFAULT_TASK_TYPE:
            return load_local_task(name, **local_kwargs)
        # the other kinds' files have fixed columns: an option that names columns would be ignored
        named = [k for k, default in CLASSIFICATION_FILE_OPTIONS.items() if local_kwargs.get(k, default) != default]
        if named:
            flags = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in named)
            raise DataError(f"{flags}: only for sequence-classification files; {kind.TASK_TYPE} files have "
                            f"fixed columns: {kind.LOCAL_FILES}")
        data = kind.load_local(name, **local_kwargs)
        logger.info("task %s (%s): %s", name, kind.TASK_TYPE, data.sizes())
        return data
    d = get_definition(name)
    if task_type is not None and task_type != d.task_type:
        raise DataError(f"task {d.name!r} is a {d.task_type} task, not {task_type}")
    if d.source == "conll":
        if conll_dir is None:
            raise DataError(f"task {d.name!r} needs conll_dir=<folder with the CoNLL-2003 files> (--conll-dir); "
                            f"no package ships CoNLL-2003")
        data = token_classification.load_conll_dir(d, Path(conll_dir))
    elif d.source == "glue":
        data = _load_glue_dir(d, Path(glue_dir)) if glue_dir is not None else _load_glue_hub(d)
    else:
        data = _WHEEL_LOADERS[d.name](d, cache_dir)
    logger.info("task %s: %s", d.name, data.sizes())
    return check_splits(data)


# ---------------------------------------------------------------------------------------------------
# GLUE


@dataclass(frozen=True)
class _GlueLayout:
    """Where a GLUE task's fields are in the official TSV files (read with no quoting, as GLUE is)."""

    folder: str
    columns: tuple[str | int, ...]  # header names, or field indices when the file has no header
    label: str | int
    tests: dict[str, str] = field(default_factory=lambda: {"test": "dev.tsv"})
    header: bool = True
    skip_malformed: bool = False  # QQP's train.tsv has a few rows with missing fields: skipped, as is customary


_GLUE = {
    "cola": _GlueLayout("CoLA", (3,), 1, header=False),  # source, label, original mark, sentence
    "sst2": _GlueLayout("SST-2", ("sentence",), "label"),
    "mrpc": _GlueLayout("MRPC", ("#1 String", "#2 String"), "Quality"),
    "qqp": _GlueLayout("QQP", ("question1", "question2"), "is_duplicate", skip_malformed=True),
    "stsb": _GlueLayout("STS-B", ("sentence1", "sentence2"), "score"),
    "mnli": _GlueLayout("MNLI", ("sentence1", "sentence2"), "gold_label",
                        {"test": "dev_matched.tsv", "test_mismatched": "dev_mismatched.tsv"}),
    "qnli": _GlueLayout("QNLI", ("question", "sentence"), "label"),
    "rte": _GlueLayout("RTE", ("sentence1", "sentence2"), "label"),
}
_MRPC_RAW = ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt")


def _glue_files(d: TaskDefinition, glue_dir: Path) -> dict[str, Path]:
    layout = _GLUE[d.name]
    folder = glue_dir / layout.folder
    if not folder.is_dir() and any((glue_dir / f).is_file() for f in ("train.tsv", _MRPC_RAW[0])):
        folder = glue_dir  # the task's own folder was given
    files = {"train": folder / "train.tsv", **{s: folder / f for s, f in layout.tests.items()}}
    if d.name == "mrpc" and not files["train"].exists() and (folder / _MRPC_RAW[0]).exists():
        # Only the original MSR files: their labelled test set is the test split.
        files = {"train": folder / _MRPC_RAW[0], "test": folder / _MRPC_RAW[1]}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"GLUE task {d.name!r}: file(s) not found: {', '.join(missing)}; glue_dir must be the "
                        f"GLUE root (with {layout.folder}/) or the {layout.folder} folder itself")
    return files


def _read_glue_tsv(path: Path, d: TaskDefinition) -> list[Example]:
    layout = _GLUE[d.name]
    out, skipped = [], []
    with open(path, encoding="utf-8-sig", newline="\n") as f:  # a stray "\r" inside a text is not a row end
        lines = iter(enumerate(f, 1))
        if layout.header:
            header = next(lines, (1, ""))[1].rstrip("\r\n").split("\t")
            need = [c for c in (*layout.columns, layout.label) if c not in header]
            if need:
                raise DataError(f"{path}:1: missing column(s) {need}; columns present: {header}")
            idx = [header.index(c) for c in (*layout.columns, layout.label)]
            width = len(header)
        else:
            idx, width = [*layout.columns, layout.label], None
        for n, line in lines:
            fields = line.rstrip("\r\n").split("\t")
            if fields == [""]:
                continue
            if (width is not None and len(fields) < width) or len(fields) <= max(idx):
                if layout.skip_malformed:
                    skipped.append(n)
                    continue
                raise DataError(f"{path}:{n}: unparseable row: {len(fields)} tab-separated fields, expected "
                                f"{width or max(idx) + 1}")
            texts = [fields[i] for i in idx[:-1]]
            label = _parse_label(fields[idx[-1]], d, f"{path}:{n}")
            out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if skipped:
        logger.warning("%s: skipped %d malformed rows (first at line %d)", path, len(skipped), skipped[0])
    return out


def _parse_label(raw: str, d: TaskDefinition, where: str) -> int | float:
    raw = raw.strip()
    if d.problem_type == REGRESSION:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number") from None
        lo, hi = d.label_range or (float("-inf"), float("inf"))
        if not lo <= value <= hi:
            raise DataError(f"{where}: label {value} outside the range [{lo}, {hi}] of task {d.name!r}")
        return value
    if raw in d.label2id:
        return d.label2id[raw]
    if d.source == "glue" and raw.isdigit() and int(raw) < d.num_labels:  # GLUE files store ids
        return int(raw)
    raise DataError(f"{where}: label {raw!r} outside the label set of task {d.name!r}: {list(d.label_names)}")


def _carve_validation(d: TaskData, train: list[Example]) -> dict[str, list[Example]]:
    defn = d.definition
    strata = [e.label for e in train] if defn.problem_type == SINGLE_LABEL else None
    parts = grouped_split([str(i) for i in range(len(train))], strata, defn.split_fractions, defn.split_seed)
    return split_rows(train, parts, SPLITS)


def _load_glue_dir(d: TaskDefinition, glue_dir: Path) -> TaskData:
    files = _glue_files(d, glue_dir)
    data = TaskData(d)
    held_out = {s: _read_glue_tsv(p, d) for s, p in files.items() if s != "train"}
    data.splits = _carve_validation(data, _read_glue_tsv(files["train"], d))
    data.splits.update(held_out)
    return data


def _load_glue_hub(d: TaskDefinition) -> TaskData:
    try:
        import datasets
    except ImportError:
        raise DataError(f"GLUE task {d.name!r} needs glue_dir=<folder in the official GLUE layout>, or the "
                        "`datasets` package (pip install 'increlora[datasets]') and access to the Hugging Face "
                        "hub") from None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", d.name)
    except Exception as e:  # network, hub or cache failures all end here
        raise DataError(f"could not load GLUE {d.name!r} through `datasets` ({e}); "
                        f"pass glue_dir=<folder in the official GLUE layout> to read local files") from e
    hub_tests = {"test": "validation_matched", "test_mismatched": "validation_mismatched"} if d.name == "mnli" \
        else {"test": "validation"}

    def rows(split: str) -> list[Example]:
        return [Example(r[d.text_fields[0]], r[d.text_fields[1]] if d.is_pair else None,
                        _parse_label(str(r["label"]), d, f"glue/{d.name}/{split}[{i}]"))
                for i, r in enumerate(ds[split])]

    data = TaskData(d)
    data.splits = _carve_validation(data, rows("train"))
    data.splits.update({s: rows(h) for s, h in hub_tests.items()})
    return data


# ---------------------------------------------------------------------------------------------------
# offline tasks from pinned wheels


def _split_wheel_task(d: TaskDefinition, rows: list[Example], groups: Sequence[str], stratify: bool) -> TaskData:
    parts = grouped_split(groups, [e.label for e in rows] if stratify else None, d.split_fractions, d.split_seed)
    return TaskData(d, split_rows(rows, parts, SPLITS))


def _load_rotten_tomatoes(d: TaskDefinition, cache_dir) -> TaskData:
    path = fetch_asset("rotten_tomatoes", cache_dir)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        kept = [r for r in csv.DictReader(f) if r["category"] in d.label2id]  # drops the "plot" rows
    # Union of movies that share a snippet (one film under two titles), so no text crosses splits either.
    parent: dict[str, str] = {}

    def find(m: str) -> str:
        while parent.setdefault(m, m) != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie: dict[str, str] = {}
    for r in kept:
        a, b = find(r["movie_name"]), find(first_movie.setdefault(r["text"], r["movie_name"]))
        if a != b:
            parent[max(a, b)] = min(a, b)
    rows = [Example(r["text"], None, d.label2id[r["category"]]) for r in kept]
    return _split_wheel_task(d, rows, [find(r["movie_name"]) for r in kept], stratify=False)


def _load_sms_spam(d: TaskDefinition, cache_dir) -> TaskData:
    path = fetch_asset("sms_spam", cache_dir)
    seen: dict[str, Example] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            label, sep, text = line.rstrip("\r\n").partition("\t")
            if not sep or label not in d.label2id:
                raise DataError(f"{path}:{n}: unparseable row, expected 'ham|spam<TAB>text'")
            seen.setdefault(text, Example(text, None, d.label2id[label]))  # exact duplicates: keep the first
    rows = list(seen.values())
    return _split_wheel_task(d, rows, [e.text for e in rows], stratify=True)


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")  # a few BBC files are Windows-1252 (the pound sign)
    return " ".join(text.split())


def _load_bbc_news(d: TaskDefinition, cache_dir) -> TaskData:
    root = fetch_asset("bbc_news", cache_dir)
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if classes != d.label_names:
        raise DataError(f"{root}: classes {classes} differ from the task's {d.label_names}; the cache is stale, "
                        f"delete it and retry")
    rows = [Example(_read_article(p), None, i) for i, c in enumerate(classes) for p in sorted((root / c).glob("*.txt"))]
    # Some articles appear twice: identical texts form one group so they land in the same split.
    return _split_wheel_task(d, rows, [e.text for e in rows], stratify=True)


def _load_wnut16(d: TaskDefinition, cache_dir) -> TaskData:
    rows = token_classification.read_conll(fetch_asset("wnut16", cache_dir))
    data = TaskData(d, token_classification.split_sentences(d, rows))
    token_classification.check_tags(d, data.splits)
    return data


_WHEEL_LOADERS = {"rotten_tomatoes": _load_rotten_tomatoes, "sms_spam": _load_sms_spam, "bbc_news": _load_bbc_news,
                  "bbc_retrieval": pair_tasks.load_retrieval, "bbc_rerank": pair_tasks.load_rerank,
                  "wnut16": _load_wnut16}


# ---------------------------------------------------------------------------------------------------
# local files


# options of load_local_task that the other kinds' fixed-column files do not take, with their defaults
CLASSIFICATION_FILE_OPTIONS = {"text_column": "text", "text_pair_column": None, "label_column": "label",
                               "problem_type": None}


def load_local_task(name: str, train: str | Path, validation: str | Path | None = None, test: str | Path | None = None,
                    text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                    problem_type: str | None = None, split_seed: int = SEED) -> TaskData:
    """A task from local .csv/.tsv/.jsonl files with a header (or keys).

    Class names are the sorted distinct labels of the training file (numerically when all are
    integers). Regression only when asked (`problem_type="regression"`), labels must be numbers.
    Without `validation`, 10% of `train` is carved out by a seeded hash; without `test` there is no
    test split (and `definition.test_splits` is empty).
    """
    problem_type = problem_type or SINGLE_LABEL
    if problem_type not in (SINGLE_LABEL, REGRESSION):
        raise DataError(f"problem_type must be {SINGLE_LABEL!r} or {REGRESSION!r}, got {problem_type!r}")
    columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    train_rows = _read_local(train, columns, label_column)
    d = TaskDefinition(name=name, text_fields=tuple(columns), problem_type=problem_type, split_seed=split_seed,
                       split_fractions=(0.9, 0.1, 0.0) if validation is None else (1.0, 0.0, 0.0), source="local",
                       metrics=("pearson", "spearman") if problem_type == REGRESSION else ("accuracy", "f1"),
                       main_metric="combined" if problem_type == REGRESSION else "accuracy",
                       test_splits=("test",) if test is not None else ())
    if problem_type == SINGLE_LABEL:
        d = replace(d, label_names=_infer_label_names(train_rows, label_column))
    data = TaskData(d)

    def examples(rows: list[Row]) -> list[Example]:
        return [_local_example(r, d, columns, label_column) for r in rows]

    if validation is None:
        data.splits = _carve_validation(data, examples(train_rows))
        del data.splits["test"]
    else:
        data.splits = {"train": examples(train_rows),
                       "validation": examples(_read_local(validation, columns, label_column))}
    if test is not None:
        data.splits["test"] = examples(_read_local(test, columns, label_column))
    logger.info("task %s: %s", name, data.sizes())
    return check_splits(data)


def _read_local(path: str | Path, columns: list[str], label_column: str) -> list[Row]:
    rows = list(read_table(path))
    if not rows:
        raise DataError(f"{path}: no data rows")
    for r in rows:
        require_columns(r, [*columns, label_column])
    return rows


def _infer_label_names(rows: list[Row], label_column: str) -> tuple[str, ...]:
    names = {str(r.values[label_column]).strip() for r in rows}
    if len(names) < 2 and rows:
        raise DataError(f"{rows[0].where.rsplit(':', 1)[0]}: column {label_column!r} has a single class "
                        f"{sorted(names)}; a classifier needs at least two (wrong --label-column?)")
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    try:
        values = [float(n) for n in names]
    except ValueError:
        return tuple(sorted(names))
    if any(v != int(v) for v in values):
        raise DataError(f"labels of {rows[0].where.rsplit(':', 1)[0]} look continuous ({len(names)} distinct "
                        f"numbers); pass problem_type='regression', or use class names")
    return tuple(sorted(names, key=float))


def _local_example(r: Row, d: TaskDefinition, columns: list[str], label_column: str) -> Example:
    texts = [text_value(r, c) for c in columns]
    label = _parse_label(str(r.values[label_column]), d, r.where)
    return Example(texts[0], texts[1] if len(texts) > 1 else None, label)
