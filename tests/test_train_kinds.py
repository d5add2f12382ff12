"""increlora-train for the embedding and token-classification kinds on the tiny model: the adapter
loaded into a plain transformers model reproduces the recorded metrics, computed here independently;
resume, baselines, plots and the derived schedule work for every kind; bad input gets one line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from seqeval.metrics import f1_score
from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer, TrainerCallback

from increlora import load_adapter, read_adapter
from tests.helpers.kinds_data import (
    named_sentences,
    tagged_sentences,
    write_conll,
    write_pairs,
    write_scored,
    write_token_jsonl,
)
from tests.helpers.train_cli import FAST, InterruptAt, assert_same_adapter
from training.cli import main

NER_FAST = [x if x != "5e-3" else "3e-2" for x in FAST]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    conll = d / "conll"
    conll.mkdir()
    for name, n, seed in (("eng.train", 200, 0), ("eng.testa", 40, 1), ("eng.testb", 40, 2)):
        write_conll(conll / name, n, seed)
    return {"pairs": [write_pairs(d / f"p{i}.csv", n, i, negatives=True) for i, n in enumerate((320, 48, 40))],
            "scored": [write_scored(d / f"s{i}.csv", n, i) for i, n in enumerate((320, 48, 40))],
            "tokens": [write_token_jsonl(d / f"t{i}.jsonl", n, i) for i, n in enumerate((320, 48, 40))],
            "conll": conll}


def train(tiny_base, out, kind: str, files_, *extra, callbacks=None) -> int:
    train_file, dev, test = files_
    argv = ["--task-type", kind, "--task", "toy", "--train", str(train_file), "--validation", str(dev),
            "--test", str(test), "--model", str(tiny_base), "--output", str(out),
            *(NER_FAST if kind == "token-classification" else FAST), *extra]
    return main(argv, callbacks=callbacks)


def embed(model, tokenizer, texts, pooling) -> np.ndarray:
    """Pooling written out: the mean over real tokens (or the first token), then L2 normalisation."""
    enc = tokenizer(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    if pooling["mode"] == "cls":
        vec = hidden[:, 0]
    else:
        m = enc["attention_mask"].unsqueeze(-1).float()
        vec = (hidden * m).sum(1) / m.sum(1)
    vec = vec.numpy().astype(np.float64)
    return vec / np.linalg.norm(vec, axis=1, keepdims=True) if pooling["normalize"] else vec


def plain_embedding_model(tiny_base, out):
    adapter = read_adapter(out)
    model = AutoModel.from_pretrained(str(tiny_base)).eval()
    load_adapter(model, adapter)  # checks the base model's fingerprint too
    return model, AutoTokenizer.from_pretrained(str(tiny_base)), adapter


def csv_rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()[1:]]


def test_embedding_pairs_train_save_and_score_like_a_plain_model(tiny_base, files, tmp_path, caplog):
    out = tmp_path / "emb"
    with caplog.at_level(logging.INFO):
        assert train(tiny_base, out, "embedding", files["pairs"]) == 0
    assert "IncreLoRA schedule over 28 steps" in caplog.text  # the derived schedule, as for classifiers
    for png in ("ranks_heatmap.png", "rank_growth.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    model, tok, adapter = plain_embedding_model(tiny_base, out)
    assert (adapter.task_type, adapter.pooling, adapter.num_labels) == ("embedding", {"mode": "mean",
                                                                                      "normalize": True}, 0)
    assert adapter.config["modules_to_save"] == [] and all(n.startswith("bert.") for n in adapter.rank_pattern)
    rows = csv_rows(files["pairs"][2])
    queries = embed(model, tok, [r[0] for r in rows], adapter.pooling)
    corpus_texts = list(dict.fromkeys(r[1] for r in rows))
    corpus = embed(model, tok, corpus_texts, adapter.pooling)
    ranks = []
    for q, r in zip(queries, rows):
        order = np.argsort(-(corpus @ q), kind="stable")
        ranks.append(1 + int(np.flatnonzero(np.asarray(corpus_texts)[order] == r[1])[0]))
    ranks = np.asarray(ranks)
    want = {"mrr@10": np.mean(np.where(ranks <= 10, 1 / ranks, 0)), "recall@1": np.mean(ranks == 1),
            "recall@10": np.mean(ranks <= 10)}
    for k, v in want.items():
        assert metrics["test"][k] == pytest.approx(v, abs=1e-6), k
    assert metrics["main_metric"] == "mrr@10" and metrics["test"]["main"] == metrics["test"]["mrr@10"]
    untrained = AutoModel.from_pretrained(str(tiny_base)).eval()
    base_q, base_c = embed(untrained, tok, [r[0] for r in rows], adapter.pooling), \
        embed(untrained, tok, corpus_texts, adapter.pooling)
    base_top1 = np.mean([corpus_texts[int(np.argmax(base_c @ q))] == r[1] for q, r in zip(base_q, rows)])
    assert metrics["test"]["recall@1"] > base_top1  # training moved the embeddings the right way


def test_scored_pairs_train_with_the_cosine_loss_and_report_spearman(tiny_base, files, tmp_path):
    out = tmp_path / "sts"
    assert train(tiny_base, out, "embedding", files["scored"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, tok, adapter = plain_embedding_model(tiny_base, out)
    rows = csv_rows(files["scored"][2])
    a, b = embed(model, tok, [r[0] for r in rows], adapter.pooling), embed(model, tok, [r[1] for r in rows],
                                                                           adapter.pooling)
    scores = [float(r[2]) for r in rows]
    want = spearmanr(np.sum(a * b, axis=1), scores)[0]
    assert set(metrics["test"]) == {"spearman", "combined", "main"}
    assert metrics["test"]["spearman"] == pytest.approx(want, abs=1e-6)
    untrained = AutoModel.from_pretrained(str(tiny_base)).eval()
    a0, b0 = (embed(untrained, tok, [r[i] for r in rows], adapter.pooling) for i in (0, 1))
    target = np.asarray(scores) / 5.0  # the loss: squared error of the cosine against the score over its max
    assert np.mean((np.sum(a * b, axis=1) - target) ** 2) < 0.5 * np.mean((np.sum(a0 * b0, axis=1) - target) ** 2)


def token_predictions(tiny_base, out, sentences) -> list[list[str]]:
    """Tags of each word from a plain AutoModelForTokenClassification with the adapter loaded."""
    adapter = read_adapter(out)
    model = AutoModelForTokenClassification.from_pretrained(str(tiny_base), num_labels=adapter.num_labels).eval()
    load_adapter(model, adapter)
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    preds = []
    for tokens, _ in sentences:
        enc = tok(tokens, is_split_into_words=True, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits[0].argmax(-1).tolist()
        first = {}
        for position, word in enumerate(enc.word_ids()):
            if word is not None:
                first.setdefault(word, position)
        preds.append([adapter.labels[ids[first[w]]] for w in sorted(first)])
    return preds


def test_token_classification_from_jsonl_scores_entity_f1_like_seqeval(tiny_base, files, tmp_path):
    out = tmp_path / "ner"
    assert train(tiny_base, out, "token-classification", files["tokens"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = read_adapter(out)
    assert adapter.task_type == "token-classification" and adapter.config["label_all_tokens"] is False
    assert adapter.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    sentences = tagged_sentences(40, 2)
    preds = token_predictions(tiny_base, out, sentences)
    truth = [tags[:len(p)] for (_, tags), p in zip(sentences, preds)]  # words cut by --max-length drop out
    assert metrics["test"]["f1"] == pytest.approx(f1_score(truth, preds), abs=1e-9)
    assert metrics["test"]["f1"] > 0.3


@pytest.mark.parametrize("method", ["increlora", "lora"])
def test_a_tagger_learns_entities_its_words_give_away_almost_exactly(tiny_base, tmp_path, method):
    # Each word says its tag and is cut into a telling first piece and "##z" pieces: a pipeline that
    # trains and saves the head and puts each label on its word's first piece tags the test set exactly;
    # labels on other pieces, a frozen or unsaved head, or a loss over the wrong positions cannot.
    files = [write_token_jsonl(tmp_path / f"n{i}.jsonl", n, i, named_sentences) for i, n in enumerate((320, 48, 40))]
    out = tmp_path / "named"
    assert train(tiny_base, out, "token-classification", files, "--steps", "80", "--method", method) == 0
    sentences = named_sentences(40, 2)
    preds = token_predictions(tiny_base, out, sentences)
    truth = [tags[:len(p)] for (_, tags), p in zip(sentences, preds)]
    assert sum(len(p) for p in preds) == sum(len(t) for _, t in sentences)  # no word cut off: all are scored
    assert f1_score(truth, preds) >= 0.95
    assert json.loads((out / "metrics.json").read_text())["test"]["f1"] == pytest.approx(f1_score(truth, preds))


class GroupRates(TrainerCallback):
    """The learning rate of every trainable parameter at one step, by name."""

    def __init__(self, step: int):
        self.step, self.rates = step, {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == self.step:
            names = {id(p): n for n, p in model.named_parameters()}
            self.rates = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method,scale", [("increlora", None), ("lora", None), ("lora", "1")])
def test_the_tagger_head_learns_at_its_own_multiple_of_the_adapters_rate(tiny_base, files, tmp_path, method, scale):
    rates = GroupRates(10)  # after the warmup of the first groups (4 steps), before the last growth
    extra = ["--head-lr-scale", scale] if scale else []
    assert train(tiny_base, tmp_path / "o", "token-classification", files["tokens"], "--steps", "12", "--method",
                 method, *extra, callbacks=[rates]) == 0
    head = {n: r for n, r in rates.rates.items() if "classifier" in n}
    first = {n: r for n, r in rates.rates.items() if "lora_A" in n and ("lora_A.0" in n or method == "lora")}
    assert len(head) == 2 and first  # the classifier's weight and bias; the first adapter blocks
    assert len(set(first.values())) == 1 and len(set(head.values())) == 1
    want = float(scale) if scale else 10.0  # the token-classification kind's default
    assert next(iter(head.values())) == pytest.approx(want * next(iter(first.values())))


def test_conll_folder_in_the_official_layout(tiny_base, files, tmp_path):
    out = tmp_path / "conll"
    argv = ["--task", "conll2003", "--conll-dir", str(files["conll"]), "--model", str(tiny_base), "--output",
            str(out), *NER_FAST]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert read_adapter(out).labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    sentences = tagged_sentences(40, 2)  # eng.testb, written in IOB1: read back as IOB2
    preds = token_predictions(tiny_base, out, sentences)
    truth = [tags[:len(p)] for (_, tags), p in zip(sentences, preds)]
    assert metrics["test"]["f1"] == pytest.approx(f1_score(truth, preds), abs=1e-9)


@pytest.mark.parametrize("kind,data,method", [("embedding", "pairs", "increlora"),
                                              ("token-classification", "tokens", "increlora"),
                                              ("token-classification", "tokens", "lora"),
                                              ("embedding", "pairs", "adalora")])
def test_every_kind_resumes_after_ctrl_c_to_the_same_adapter(tiny_base, files, tmp_path, kind, data, method):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(tiny_base, full, kind, files[data], "--method", method) == 0
    assert train(tiny_base, part, kind, files[data], "--method", method, callbacks=[InterruptAt(11)]) == 130
    assert train(tiny_base, part, kind, files[data], "--method", method, "--resume") == 0
    assert_same_adapter(full, part)
    assert json.loads((full / "metrics.json").read_text())["test"] == \
        pytest.approx(json.loads((part / "metrics.json").read_text())["test"])


@pytest.mark.parametrize("kind,data,method", [("embedding", "pairs", "lora"),
                                              ("token-classification", "tokens", "lora"),
                                              ("token-classification", "tokens", "adalora")])
def test_baselines_of_every_kind_write_adapters_of_that_kind(tiny_base, files, tmp_path, kind, data, method):
    out = tmp_path / method
    assert train(tiny_base, out, kind, files[data], "--method", method) == 0
    adapter = read_adapter(out)
    assert adapter.task_type == kind and adapter.config["metadata"]["method"] == method
    assert (out / "peft" / "adapter_config.json").is_file()
    plain = AutoModel if kind == "embedding" else AutoModelForTokenClassification
    kw = {} if kind == "embedding" else {"num_labels": adapter.num_labels}
    load_adapter(plain.from_pretrained(str(tiny_base), **kw), adapter)  # the fingerprint matches the base
    if kind == "embedding":
        assert adapter.pooling == {"mode": "mean", "normalize": True} and adapter.config["modules_to_save"] == []


def test_bad_kind_input_gives_one_line_errors(tiny_base, files, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("query,document\na,b\n")
    assert train(tiny_base, tmp_path / "o1", "embedding", [bad, bad, bad]) == 1
    assert "anchor,positive[,negative] or sentence1,sentence2,score" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("anchor,positive\na b,\n")
    assert train(tiny_base, tmp_path / "o2", "embedding", [empty, empty, empty]) == 1
    assert "is empty" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"tokens": ["she"], "tags": ["B-XYZ"]}) + "\n")
    assert train(tiny_base, tmp_path / "o3", "token-classification",
                 [files["tokens"][0], unknown, unknown]) == 1
    assert "['B-XYZ'] that are not in the training file's tag set" in capsys.readouterr().err
    assert main(["--task", "bbc_news", "--task-type", "embedding", "--output", str(tmp_path / "o4")]) == 1
    assert "is a sequence-classification task, not embedding" in capsys.readouterr().err
    assert main(["--task", "conll2003", "--output", str(tmp_path / "o5")]) == 1
    assert "--conll-dir" in capsys.readouterr().err
