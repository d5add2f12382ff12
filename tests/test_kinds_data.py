"""The kinds' data reading, losses and metrics, each against an independent computation."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from seqeval.metrics import f1_score as seqeval_f1
from sklearn.metrics import label_ranking_average_precision_score, top_k_accuracy_score

from tests.helpers.kinds_data import tagged_sentences, to_iob1, write_conll, write_pairs, write_scored
from training.data import DataError, TaskDefinition
from training.kinds import embedding, kind_of
from training.kinds import token_classification as tc
from training.metrics import compute_metrics
from training.tasks import WNUT16_TAGS, load_task

RERANK = TaskDefinition("r", ("query", "document"), ("irrelevant", "relevant"), metrics=("mrr@10", "ndcg@10"),
                        main_metric="mrr@10")


def test_reranking_mrr_and_ndcg_against_a_direct_computation():
    rng = np.random.default_rng(0)
    groups, labels, logits = [], [], []
    for g in range(30):
        n = int(rng.integers(3, 16))
        rel = np.zeros(n, dtype=int)
        rel[rng.choice(n, size=int(rng.integers(1, 3)), replace=False)] = 1
        groups += [f"q{g}"] * n
        labels += rel.tolist()
        logits.append(rng.normal(size=(n, 2)))
    logits = np.concatenate(logits)
    got = compute_metrics(RERANK, logits, labels, groups)
    prob = np.exp(logits[:, 1]) / np.exp(logits).sum(1)  # P(relevant): the order the metrics must follow
    mrr, ndcg = [], []
    for g in dict.fromkeys(groups):
        rows = [i for i, x in enumerate(groups) if x == g]
        order = sorted(rows, key=lambda i: -prob[i])
        first = next(k for k, i in enumerate(order, 1) if labels[i])
        mrr.append(1 / first if first <= 10 else 0.0)
        dcg = sum(labels[i] / math.log2(k + 1) for k, i in enumerate(order[:10], 1))
        ideal = sum(1 / math.log2(k + 1) for k in range(1, min(10, sum(labels[i] for i in rows)) + 1))
        ndcg.append(dcg / ideal)
    assert got["mrr@10"] == pytest.approx(np.mean(mrr)) and got["ndcg@10"] == pytest.approx(np.mean(ndcg))
    assert got["main"] == got["mrr@10"]
    # a constant scorer gets no credit from ties; one logit per row works too
    tied = compute_metrics(RERANK, np.zeros((4, 1)), [0, 1, 0, 0], ["a"] * 4)
    assert tied["mrr@10"] == pytest.approx(0.25)
    with pytest.raises(DataError, match="query of each row"):
        compute_metrics(RERANK, logits, labels)


def test_retrieval_metrics_against_sklearn():
    rng = np.random.default_rng(1)
    a, p = rng.normal(size=(9, 8)), rng.normal(size=(9, 8))
    texts = [f"doc{i}" for i in range(9)]
    got = embedding.retrieval_metrics(a, p, texts)
    sims = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    truth = np.eye(9, dtype=int)
    assert got["mrr@10"] == pytest.approx(label_ranking_average_precision_score(truth, sims))  # 9 docs: all in top 10
    assert got["recall@1"] == pytest.approx(top_k_accuracy_score(np.arange(9), sims, k=1, labels=np.arange(9)))
    assert got["recall@10"] == 1.0
    # one text twice is one document of the corpus, relevant to both anchors
    a2, p2 = np.eye(3), np.array([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])
    assert embedding.retrieval_metrics(a2, p2, ["x", "y", "x"])["recall@1"] == pytest.approx(2 / 3)


def test_token_f1_is_seqeval_on_the_first_sub_tokens():
    d = tc.definition("ner", ("O", "B-LOC", "I-LOC", "B-PER", "I-PER"))
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["O", "B-LOC", "O"]]
    ids = {t: i for i, t in enumerate(d.label_names)}
    labels = np.full((2, 7), tc.IGNORE)
    logits = np.zeros((2, 7, 5))
    for r, (t_row, p_row) in enumerate(zip(true, pred)):
        for w, (t, p) in enumerate(zip(t_row, p_row)):
            labels[r, 1 + w] = ids[t]  # position 0: [CLS]
            logits[r, 1 + w, ids[p]] = 1.0
        logits[r, 0, ids["B-PER"]] = 5.0  # ignored positions must not count
    got = tc.compute_metrics(d, logits, labels)
    assert got["f1"] == pytest.approx(seqeval_f1(true, pred)) == pytest.approx(1 / 3)  # 1 of 3 true, 1 of 3 predicted


def test_first_sub_token_alignment_and_iob2():
    assert tc.align_labels([None, 0, 0, 1, None, 2, 2, None], [3, 4, 0]) == [-100, 3, -100, 4, -100, 0, -100, -100]
    assert tc.to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"], "x") == \
        ("B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG")
    for _, tags in tagged_sentences(50, 3):
        assert tc.to_iob2(to_iob1(tags), "x") == tuple(tags) == tc.to_iob2(tags, "x")
    with pytest.raises(DataError, match="is not IOB"):
        tc.to_iob2(["E-PER"], "f:3")


def test_ranking_loss_is_cross_entropy_over_in_batch_and_hard_negatives():
    torch.manual_seed(0)
    a, p, n = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731 - the formula, written out
    for candidates in ([p], [p, n]):
        rows = [c[j] for c in candidates for j in range(4)]
        want = np.mean([-math.log(math.exp(20 * cos(a[i], p[i])) / sum(math.exp(20 * cos(a[i], r)) for r in rows))
                        for i in range(4)])
        assert float(embedding.ranking_loss(a, torch.cat(candidates))) == pytest.approx(want, rel=1e-5)
    score = torch.tensor([1.0, 0.0, 0.5, 0.2])
    want = np.mean([(cos(a[i], p[i]) - float(score[i])) ** 2 for i in range(4)])
    assert float(embedding.cosine_loss(a, p, score)) == pytest.approx(want, rel=1e-5)


def test_pooling_modes():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = embedding.pool(h, mask, {"mode": "mean", "normalize": False})
    torch.testing.assert_close(mean[0], h[0, :2].mean(0))
    torch.testing.assert_close(embedding.pool(h, mask, {"mode": "cls", "normalize": True}), F.normalize(h[:, 0]))


def test_embedding_files_carving_and_score_scaling(tmp_path):
    data = load_task("faq", task_type="embedding", train=write_pairs(tmp_path / "p.csv", 100, 0))
    assert data.definition.task_type == "embedding" and data.sizes() == {"train": 90, "validation": 10}
    assert data.definition.metrics == ("mrr@10", "recall@1", "recall@10")
    scored = load_task("sts", task_type="embedding", train=write_scored(tmp_path / "s.csv", 50, 0),
                       validation=write_scored(tmp_path / "v.csv", 10, 1))
    assert {e.label for e in scored.splits["train"]} == {0.0, 1.0}  # 0-5 scores over their max
    assert scored.definition.main_metric == "spearman"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n" + json.dumps({"anchor": "c"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: missing column 'positive'"):
        load_task("x", task_type="embedding", train=jsonl)
    mixed = tmp_path / "m.csv"
    mixed.write_text("anchor,positive\na,b\nc,d\n")
    with pytest.raises(DataError, match="scored pairs, but the training file has anchor/positive"):
        load_task("x", task_type="embedding", train=mixed, validation=write_scored(tmp_path / "w.csv", 3, 0))
    bad = tmp_path / "b.csv"
    bad.write_text("sentence1,sentence2,score\na,b,high\n")
    with pytest.raises(DataError, match="score 'high' is not a number"):
        load_task("x", task_type="embedding", train=bad)
    with pytest.raises(DataError, match="unknown task type"):
        kind_of("ranking")
    pairs = write_pairs(tmp_path / "q.csv", 20, 0)
    with pytest.raises(DataError, match=r"text_column \(--text-column\): only for sequence-classification files; "
                                        r"embedding files have fixed columns: anchor,positive"):
        load_task("x", task_type="embedding", train=pairs, text_column="question")
    with pytest.raises(DataError, match=r"label_column \(--label-column\), problem_type"):
        load_task("x", task_type="embedding", train=pairs, label_column="y", problem_type="regression")
    assert load_task("x", task_type="embedding", train=pairs, text_column="text", text_pair_column=None).sizes()


def test_token_files_jsonl_conll_and_their_errors(tmp_path):
    conll = write_conll(tmp_path / "a.conll", 30, 0)
    data = load_task("ner", task_type="token-classification", train=conll)
    want = [tuple(tags) for _, tags in tagged_sentences(30, 0)]
    rows = data.splits["train"] + data.splits["validation"]
    assert sorted(e.tags for e in rows) == sorted(want)  # IOB1 on disk, IOB2 in memory
    assert data.definition.label_names == ("O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    bad = tmp_path / "bad.jsonl"
    for line, message in ((["she"], "two lists"), ({"tokens": ["a", "b"], "tags": ["O"]}, "2 tokens and 1 tags"),
                          ({"tokens": ["a"], "tags": [3]}, "tags strings")):
        bad.write_text(json.dumps(line if isinstance(line, dict) else {"tokens": line}) + "\n")
        with pytest.raises(DataError, match=message):
            load_task("ner", task_type="token-classification", train=bad)
    one_column = tmp_path / "x.conll"
    one_column.write_text("word\n")
    with pytest.raises(DataError, match="x.conll:1: expected 'word ... tag'"):
        load_task("ner", task_type="token-classification", train=one_column)
    with pytest.raises(DataError, match="eng.train/eng.testa/eng.testb or train.txt/valid.txt/test.txt"):
        load_task("conll2003", conll_dir=tmp_path)
    with pytest.raises(DataError, match=r"text_pair_column .*token-classification files have fixed columns: JSONL"):
        load_task("ner", task_type="token-classification", train=conll, text_pair_column="b")


# ------------------------------------------------------------------------------------------------
# the real tasks (pip fetch on the first run, then cached)


@pytest.mark.slow
def test_real_bbc_pairs_split_by_article_as_bbc_news_is():
    retrieval, rerank, news = load_task("bbc_retrieval"), load_task("bbc_rerank"), load_task("bbc_news")
    for split in ("train", "validation", "test"):
        bodies = {e.text_pair for e in retrieval.splits[split]}
        # an article's body is in the bbc_news text of the same split, and in no other split
        assert all(any(b in t for t in (e.text for e in news.splits[split])) for b in list(bodies)[:20])
        pairs = rerank.splits[split]
        per_query = Counter(e.group for e in pairs)
        positives = Counter(e.group for e in pairs if e.label == 1)
        assert set(positives.values()) == {1} and len(positives) == len(retrieval.splits[split])
        assert set(per_query.values()) == {4 if split == "train" else 10}
        assert {e.text_pair for e in pairs} == bodies  # negatives come from the same split
    sizes = retrieval.sizes()
    assert sum(sizes.values()) == 2125 and abs(sizes["test"] / 2125 - 0.1) < 0.01
    assert load_task("bbc_rerank").splits == rerank.splits  # deterministic


@pytest.mark.slow
def test_real_wnut16_sentences_tags_and_split():
    data = load_task("wnut16")
    rows = [e for s in data.splits.values() for e in s]
    assert len(rows) == 2394 and sum(len(e.tokens) for e in rows) == 46469
    tags = Counter(t for e in rows for t in e.tags)
    assert set(tags) <= set(WNUT16_TAGS) and tags["B-person"] == 449
    assert all(len(e.tokens) == len(e.tags) for e in rows)
    assert data.sizes()["test"] == 239 and load_task("wnut16").splits == data.splits


def test_pairs_cut_to_their_first_tokens_tokenize_as_the_whole_pair(tiny_base):
    from transformers import AutoTokenizer

    from training.data import cut_to_tokens

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    words = "the striker scored twice, and markets rallied on friday; tech shares rose".split()
    rng = np.random.default_rng(0)
    a = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 30, size=20)]
    b = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 300, size=20)]
    for max_length in (8, 16, 64):
        whole = tok(a, b, truncation=True, max_length=max_length)
        cut = tok(cut_to_tokens(tok, a, max_length), cut_to_tokens(tok, b, max_length), truncation=True,
                  max_length=max_length)
        assert cut["input_ids"] == whole["input_ids"] and cut["token_type_ids"] == whole["token_type_ids"]
    assert all(len(t) < 200 for t in cut_to_tokens(tok, b, 8))


def test_pairs_are_cut_where_reading_each_text_whole_cuts_them(tiny_base):
    """cut_to_tokens reads a long text's beginning first: its cuts equal those of the whole texts, also for a
    long word or a run of spaces at the end of that beginning, few tokens in it, and text without spaces."""
    from transformers import AutoTokenizer

    from training.data import cut_to_tokens

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    rng = np.random.default_rng(1)
    words = ["the", "striker", "scored", "twice,", "markets", "rallied", "x" * 40, " " * 30, "é", "--"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 200, size=60)]
    texts += ["word " * 30 + "y" * 400, "z" * 1000, " " * 500 + "late words", "a" * 127 + " b" * 100, "",
              "a b " + "\u0301" * 300 + " d" * 40]  # accents alone: a word without tokens (the tokenizer strips them)
    for max_length in (4, 8, 16):
        enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length,
                  return_offsets_mapping=True)
        whole = [t[:o[-1][1]] if o else t for t, o in zip(texts, enc["offset_mapping"])]
        assert cut_to_tokens(tok, texts, max_length) == whole


def test_embedding_sides_of_long_documents_tokenize_as_the_whole_texts(tiny_base):
    from transformers import AutoTokenizer

    from training.data import Example
    from training.kinds import embedding

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    words = "the striker scored twice, and markets rallied on friday; tech shares rose".split()
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 400, size=30)]
    rows = [Example(texts[i], texts[-1 - i], 1.0, negative=texts[(i + 7) % 30]) for i in range(30)]
    for max_length in (8, 32):
        items = embedding.to_dataset(embedding.definition("toy", scored=False), rows, tok, max_length).items
        for side, column in (("anchor", "text"), ("positive", "text_pair"), ("negative", "negative")):
            whole = tok([getattr(r, column) for r in rows], truncation=True, max_length=max_length)
            assert [it[f"{side}_input_ids"] for it in items] == whole["input_ids"], (side, max_length)
