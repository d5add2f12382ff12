"""Tasks of every kind in one bank: a mixed-kind batch equals each task alone, and each kind equals a plain
transformers model with the adapter merged (sequence logits; embeddings pooled by hand; entities from
transformers' token-classification pipeline with aggregation_strategy="first"); bad input is refused."""
from __future__ import annotations

import functools
import json
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModel, pipeline

from increlora import load_adapter
from increlora.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from serving import AdapterBank
from serving.bank import AdapterShapeError, InputError, UnknownTaskError, WrongTaskKindError
from serving.bank.kinds import check_reranker, rerank_results
from tests.helpers.adapters import TAGS, encode, make_adapter, reference_model
from tests.tiny import WORDS

# task -> (task_type, num_labels, save keywords)
SPECS = {
    "cls2": ("sequence-classification", 2, {}),
    "cls3": ("sequence-classification", 3, {}),
    "reg": ("sequence-classification", 1, {"problem_type": "regression"}),
    "ner5": ("token-classification", 5, {}),
    "ner3": ("token-classification", 3, {}),
    "mean": ("embedding", 0, {"pooling": {"mode": "mean", "normalize": True}}),
    "first": ("embedding", 0, {"pooling": {"mode": "cls", "normalize": False}}),
    "one": ("sequence-classification", 1, {"problem_type": "single_label_classification"}),
    "multi1": ("sequence-classification", 1, {"problem_type": "multi_label_classification"}),
}
KIND = {task: spec[0] for task, spec in SPECS.items()}


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    for i, (task, (kind, n, kw)) in enumerate(SPECS.items()):
        make_adapter(tiny_base, folder, task, n, seed=40 + i, task_type=kind, max_rank=5, **kw)
    return folder


@pytest.fixture(scope="module")
def bank(adapters):
    bank = AdapterBank.load(adapters, backend="torch", dtype="float32")
    assert sorted(bank.tasks) == sorted(SPECS) and bank.load_errors == {}
    return bank


@functools.cache
def _embedding_model(base, adapter_dir):
    return load_adapter(AutoModel.from_pretrained(str(base)), adapter_dir).eval()


@functools.cache
def _ner_pipeline(base, adapter_dir, tokenizer):
    return pipeline("token-classification", model=reference_model(base, adapter_dir), tokenizer=tokenizer,
                    aggregation_strategy="first", device="cpu")


def by_hand(hidden: torch.Tensor, pooling: dict) -> list[float]:
    """One text's last hidden state [tokens, h] (no padding) pooled as sentence-transformers does."""
    vector = hidden.mean(dim=0) if pooling["mode"] == "mean" else hidden[0]
    if pooling["normalize"]:
        vector = vector / vector.norm()
    return vector.tolist()


def expected(base, adapters, tokenizer, task, x):
    """What the plain transformers model with the adapter merged says for x: (answer fields, raw output)."""
    kind = KIND[task]
    with torch.no_grad():
        if kind == "embedding":
            hidden = _embedding_model(base, adapters / task)(**encode(tokenizer, x)).last_hidden_state[0]
            return {"embedding": by_hand(hidden, SPECS[task][2]["pooling"]), "tokens": hidden.shape[0]}, None
        logits = reference_model(base, adapters / task)(**encode(tokenizer, x)).logits[0]
    if kind == "token-classification":
        found = [{k: e[k] for k in ("entity_group", "word", "start", "end")} | {"score": float(e["score"])}
                 for e in _ner_pipeline(base, adapters / task, tokenizer)(x)]
        return {"entities": found}, logits
    if SPECS[task][2].get("problem_type") == "regression":
        return {"value": logits.item()}, logits
    one_or_multi = len(logits) == 1 or SPECS[task][2].get("problem_type") == "multi_label_classification"
    probs = torch.sigmoid(logits) if one_or_multi else torch.softmax(logits, -1)  # as transformers' pipeline
    return {"scores": dict(zip([f"{task}_{j}" for j in range(len(logits))], probs.tolist()))}, logits


def assert_same_answer(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        if key == "entities":
            assert [{k: e[k] for k in ("entity_group", "word", "start", "end")} for e in got[key]] == \
                   [{k: e[k] for k in ("entity_group", "word", "start", "end")} for e in value]
            assert [e["score"] for e in got[key]] == pytest.approx([e["score"] for e in value], abs=1e-5)
        elif key == "scores":
            assert list(got[key]) == list(value)
            assert list(got[key].values()) == pytest.approx(list(value.values()), abs=atol)
        elif isinstance(value, list):
            assert got[key] == pytest.approx(value, abs=atol)
        else:
            assert got[key] == pytest.approx(value, abs=atol)


# words the tiny vocabulary splits into sub-tokens or does not know, punctuation, capitals, odd spacing
ODD = ["Zebra", "New-York", "o'neil", "café", "€", "42", "x1y2", ",", "!", "GOOD", "funnyish"]
word = st.sampled_from(WORDS + ODD)
text = st.lists(st.tuples(word, st.sampled_from([" ", "  ", ""])), min_size=1, max_size=10).map(
    lambda parts: "".join(w + s for w, s in parts).strip() or "a")
row = st.sampled_from(sorted(SPECS)).flatmap(lambda task: st.tuples(
    st.one_of(text, st.tuples(text, text)) if KIND[task] == "sequence-classification" else text, st.just(task)))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=10))
def test_a_mixed_kind_batch_equals_each_task_alone_and_the_merged_model(tiny_base, adapters, bank, rows):
    inputs, tasks = [x for x, _ in rows], [t for _, t in rows]
    answers, raw = bank.predict(inputs, tasks), bank.logits(inputs, tasks)
    for x, task, got, got_raw in zip(inputs, tasks, answers, raw):
        assert got["task"] == task
        (alone,) = bank.predict([x], [task])
        assert_same_answer(got, {k: v for k, v in alone.items() if k != "task"})
        want, want_raw = expected(tiny_base, adapters, bank.tokenizer, task, x)
        assert_same_answer(got, want)
        if want_raw is not None:  # sequence logits [labels]; token logits [tokens, labels], specials included
            torch.testing.assert_close(got_raw, want_raw, atol=1e-5, rtol=1e-5)


def test_entities_match_the_pipeline_on_words_split_into_sub_tokens(tiny_base, adapters, bank):
    x = "Zebra funnyish New-York and x1y2, the good film"
    (got,) = bank.predict([x], ["ner5"])
    want, _ = expected(tiny_base, adapters, bank.tokenizer, "ner5", x)
    assert_same_answer(got, want)
    assert len(bank.tokenizer.tokenize(x)) > len(x.split())  # sub-tokens present
    assert got["entities"] and all(x[e["start"]:e["end"]].lower().replace(" ", "") ==
                                   e["word"].replace(" ", "").replace("##", "") for e in got["entities"])
    assert {e["entity_group"] for e in got["entities"]} <= {t[2:] for t in TAGS if t != "O"}


def test_embed_and_task_info_by_kind(bank):
    vectors = bank.embed(["the good film", "a bad plot"], task="mean")
    assert [round(math.fsum(v * v for v in vec), 5) for vec in vectors] == [1.0, 1.0]
    assert vectors == [a["embedding"] for a in bank.predict(["the good film", "a bad plot"], "mean")]
    assert bank.embed("hello", task="first") == [bank.predict(["hello"], ["first"])[0]["embedding"]]
    info = bank.task_info("mean")
    assert info["task_type"] == "embedding" and info["pooling"] == {"mode": "mean", "normalize": True}
    assert info["dimensions"] == 32 == len(vectors[0]) and info["num_labels"] == 0 and info["problem_type"] is None
    assert bank.task_info("ner5")["task_type"] == "token-classification" and bank.task_info("ner5")["labels"] == TAGS
    assert bank.task_info("ner5")["memory_bytes"] > bank.task_info("mean")["memory_bytes"] - 5 * 33 * 4
    kinds = {t["name"]: t["task_type"] for t in bank.describe()["tasks"]}
    assert kinds == KIND


@pytest.mark.parametrize("task", ["reg", "cls2", "one", "multi1"])
def test_rerank_sorts_documents_by_the_cross_encoders_score(tiny_base, adapters, bank, task):
    query, documents = "good film", ["a bad plot", "the good film", "win a prize now", "i love this movie", "dull"]
    scores = []
    for d in documents:
        _, logits = expected(tiny_base, adapters, bank.tokenizer, task, (query, d))
        scores.append(torch.sigmoid(logits[0]).item() if len(logits) == 1 else torch.softmax(logits, -1)[1].item())
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    got = bank.rerank(query, documents, task=task)
    assert [r["index"] for r in got] == order
    assert [r["relevance_score"] for r in got] == pytest.approx([scores[i] for i in order], abs=1e-5)
    assert bank.rerank(query, documents, task=task, top_n=2) == got[:2]
    assert bank.rerank(query, documents, task=task, top_n=99) == got


@pytest.mark.parametrize("call, error, needle", [
    (lambda b: b.predict([("a pair", "of texts")], ["ner5"]), InputError, "takes single texts"),
    (lambda b: b.predict(["fine", ("a", "pair")], ["mean", "ner3"]), InputError, "input 1 is a pair"),
    (lambda b: b.embed(["hello"], task="cls2"), WrongTaskKindError, "'cls2' is a sequence-classification task"),
    (lambda b: b.embed(["hello"], task="ner5"), WrongTaskKindError, "token-classification"),
    (lambda b: b.embed([("a", "b")], task="mean"), InputError, "list of texts"),
    (lambda b: b.embed(["hello"], task="nope"), UnknownTaskError, "unknown task 'nope'"),
    (lambda b: b.rerank("q", ["d"], task="mean"), WrongTaskKindError, "'mean' is an embedding task"),
    (lambda b: b.rerank("q", ["d"], task="ner3"), WrongTaskKindError, "reranking needs"),
    (lambda b: b.rerank("q", ["d"], task="cls3"), WrongTaskKindError, "it has 3 labels"),
    (lambda b: b.rerank("q", [], task="cls2"), InputError, "non-empty list of texts"),
    (lambda b: b.rerank("q", "one text", task="cls2"), InputError, "non-empty list of texts"),
    (lambda b: b.rerank("q", ["d", 3], task="cls2"), InputError, "non-empty list of texts"),
    (lambda b: b.rerank(["q"], ["d"], task="cls2"), InputError, "query must be a text"),
    (lambda b: b.rerank("q", ["d"], task="cls2", top_n=0), InputError, "top_n"),
    (lambda b: b.rerank("q", ["d"], task="cls2", top_n=True), InputError, "top_n"),
])
def test_wrong_kind_and_wrong_shapes_are_refused(bank, call, error, needle):
    with pytest.raises(error, match=needle):
        call(bank)


def test_a_reranker_is_one_output_of_any_problem_type_or_two_labels():
    def info(n, problem_type):
        return {"name": "t", "task_type": "sequence-classification", "num_labels": n, "problem_type": problem_type}

    for n, problem_type in [(1, "regression"), (1, "single_label_classification"), (1, "multi_label_classification"),
                            (2, "single_label_classification"), (2, "multi_label_classification")]:
        check_reranker(info(n, problem_type))
    with pytest.raises(WrongTaskKindError, match="it has 2 regression outputs"):
        check_reranker(info(2, "regression"))
    assert rerank_results([{"task": "t", "scores": {"relevant": 0.7}}, {"task": "t", "value": 0.0}]) == \
        [{"index": 0, "relevance_score": 0.7}, {"index": 1, "relevance_score": 0.5}]
    for answer, kind in [({"task": "t", "value": [0.1, 0.2]}, "sequence-classification"),
                         ({"task": "t", "scores": {"a": 0.2, "b": 0.3, "c": 0.5}}, "sequence-classification"),
                         ({"task": "t", "entities": []}, "token-classification")]:
        with pytest.raises(WrongTaskKindError, match=f"'t' is a {kind} task; reranking needs"):
            rerank_results([answer])


def test_wrong_kind_error_crosses_a_process_boundary():
    exc = WrongTaskKindError("ner", "token-classification", "embed needs an embedding task", "why")
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is WrongTaskKindError and str(copy) == str(exc) and copy.task_type == "token-classification"


def _damaged(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / CONFIG_NAME).read_text())
    cfg.update(config or {})
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    weights = load_file(str(src / WEIGHTS_NAME))
    (tensors or (lambda t: None))(weights)
    save_file(weights, str(dst / WEIGHTS_NAME))
    return dst


def test_adapters_of_a_kind_that_does_not_fit_are_refused_by_name(tiny_base, other_tiny_base, adapters, tmp_path):
    def narrow(t):
        t["saved.classifier.weight"] = t["saved.classifier.weight"][:, :16].contiguous()

    bad = {
        "narrow": _damaged(adapters / "ner5", tmp_path / "narrow", {"task": "narrow"}, narrow),
        "extra": _damaged(adapters / "mean", tmp_path / "extra", {"task": "extra", "modules_to_save": ["classifier"]},
                          lambda t: t.update({"saved.classifier.weight": torch.zeros(2, 32)})),
        "other": make_adapter(other_tiny_base, tmp_path, "other", 3, seed=1, task_type="token-classification"),
    }
    bank = AdapterBank.load(list(bad.values()), base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == []
    errors = {k: bank.load_errors[str(p)] for k, p in bad.items()}
    assert isinstance(errors["narrow"], AdapterShapeError) and "token head 'classifier'" in str(errors["narrow"])
    assert isinstance(errors["extra"], AdapterShapeError) and "backbone modules only" in str(errors["extra"])
    assert "trained on base model" in str(errors["other"])


@pytest.fixture(scope="module")
def triton_bank(adapters):
    return AdapterBank.load(adapters, backend="triton", dtype="float32")


def test_the_triton_path_serves_every_kind(bank, triton_bank):
    inputs = ["the good film", "Zebra in New-York", ("a plot", "the story"), "hello", "win a prize", "dull movie"]
    tasks = ["mean", "ner5", "cls2", "first", "ner3", "reg"]
    assert triton_bank.backend == "triton"
    for got, want in zip(triton_bank.logits(inputs, tasks), bank.logits(inputs, tasks)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(triton_bank.predict(inputs, tasks), bank.predict(inputs, tasks)):
        assert_same_answer(got, {k: v for k, v in want.items() if k != "task"})


@pytest.mark.slow
def test_the_model_process_carries_every_kind(adapters, bank):
    from serving.bank import ProcessBank

    child = ProcessBank.start(functools.partial(AdapterBank.load, str(adapters), backend="torch", dtype="float32"),
                               timeout=120)
    try:
        inputs, tasks = ["the good film", "Zebra in New-York", ("a", "b")], ["mean", "ner5", "cls2"]
        for got, want in zip(child.predict(inputs, tasks), bank.predict(inputs, tasks)):
            assert_same_answer(got, {k: v for k, v in want.items() if k != "task"})
        assert child.embed(["hello"], "first")[0] == pytest.approx(bank.embed(["hello"], "first")[0], abs=1e-6)
        assert [r["index"] for r in child.rerank("q", ["a", "b", "c"], "reg", 2)] == \
               [r["index"] for r in bank.rerank("q", ["a", "b", "c"], "reg", top_n=2)]
        assert child.task_info("mean")["pooling"] == {"mode": "mean", "normalize": True}
        with pytest.raises(WrongTaskKindError, match="embedding task"):
            child.embed(["x"], "cls2")
    finally:
        child.close()
