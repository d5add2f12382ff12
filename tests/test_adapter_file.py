import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from increlora import (
    TASK_TYPES,
    AdapterFormatError,
    BaseModelMismatchError,
    IncreLoraConfig,
    apply_increlora,
    default_pooling,
    load_adapter,
    read_adapter,
    save_adapter,
)
from increlora.adapter_file import CONFIG_NAME, WEIGHTS_NAME, _first_non_finite
from tests.helpers.adapters import TAGS, kind_model, make_adapter
from tests.loop import train
from tests.tiny import tiny_classifier

CFG = IncreLoraConfig(target_avg_rank=2.5, top_h=3, init_warmup=3, interval=2, warmup_steps=2, lora_dropout=0.0)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    model, *_ = train(tiny_base, CFG, 16)
    path = tmp_path_factory.mktemp("adapter") / "sentiment"
    save_adapter(model, path, task="sentiment", labels=["neg", "pos"], base_model=str(tiny_base), note="x")
    return model.eval(), path


def _ids():
    return torch.randint(5, 100, (4, 11), generator=torch.Generator().manual_seed(7))


def test_round_trip_gives_the_same_logits(trained, tiny_base):
    model, path = trained
    fresh = load_adapter(tiny_classifier(tiny_base, 2, seed=99), path).eval()
    torch.testing.assert_close(fresh(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=1e-6)
    assert fresh.config.id2label == {0: "neg", 1: "pos"}


def test_file_holds_active_components_only(trained):
    model, path = trained
    adapter = read_adapter(path)
    ranks = adapter.rank_pattern
    assert len(set(ranks.values())) > 1  # ranks differ from module to module
    assert sum(ranks.values()) == round(2.5 * 12)
    for name, f in adapter.modules.items():
        layer = model.get_submodule(name)
        assert f.A.shape == (ranks[name], layer.in_features) and f.B.shape == (layer.out_features, ranks[name])
    assert not any("reserve" in k for k in load_file(str(path / WEIGHTS_NAME)))
    cfg = json.loads((path / CONFIG_NAME).read_text())
    assert cfg["task"] == "sentiment" and cfg["labels"] == ["neg", "pos"] and cfg["metadata"] == {"note": "x"}
    assert cfg["increlora_config"]["target_avg_rank"] == 2.5 and cfg["rank_scaling"] == "active"
    assert set(cfg["modules_to_save"]) == {"bert.pooler", "classifier"}


def test_refuses_another_base_model(trained, other_tiny_base):
    _, path = trained
    with pytest.raises(BaseModelMismatchError, match="trained on base model"):
        load_adapter(tiny_classifier(other_tiny_base, 2), path)


def test_refuses_wrong_head_shape(trained, tiny_base):
    _, path = trained
    with pytest.raises(AdapterFormatError, match="num_labels=2"):
        load_adapter(tiny_classifier(tiny_base, 3), path)


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes((path / name).read_bytes())
    return dst


def _edit_config(dst, **changes):
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    cfg.update(changes)
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))


def _edit_tensors(dst, fn):
    tensors = load_file(str(dst / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(dst / WEIGHTS_NAME))


@pytest.mark.parametrize("damage, needle", [
    (lambda d: _edit_config(d, format_version=99), "format version 99"),
    (lambda d: _edit_config(d, format="something"), "not an IncreLoRA adapter"),
    (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / CONFIG_NAME).unlink(), "missing"),
    (lambda d: (d / WEIGHTS_NAME).unlink(), "missing"),
    (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:300]), "corrupted"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(next(k for k in t if k.endswith(".B")))), "missing tensors"),
    (lambda d: _edit_tensors(d, lambda t: t[next(k for k in t if k.endswith(".A"))].fill_(float("nan"))), "NaN or inf"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(next(k for k in t if k.endswith(".E")),
                                                        torch.ones(40))), "expected A"),
    (lambda d: _edit_tensors(d, lambda t: t[next(k for k in t if k.endswith(".E"))].fill_(float("inf"))), "NaN or inf"),
    (lambda d: _edit_tensors(d, lambda t: t["saved.classifier.weight"].view(-1)[3].fill_(float("-inf"))),
     "classifier.weight contains NaN or inf"),
    (lambda d: _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if k.startswith("saved.classifier")]),
     "module_to_save"),
    (lambda d: _edit_config(d, labels=["a"]), "labels"),
    (lambda d: _edit_config(d, problem_type="ranking"), "problem_type"),
    # valid JSON of the wrong shape: refused by name, never an AttributeError later
    (lambda d: _edit_config(d, scaling_pattern=[1.0]), "scaling_pattern must map"),
    (lambda d: _edit_config(d, rank_pattern=["bert.encoder.layer.0.attention.self.query"]), "rank_pattern must map"),
    (lambda d: _edit_config(d, rank_pattern={"bert.encoder.layer.0.attention.self.query": 1.5}), "rank_pattern"),
    (lambda d: _edit_config(d, modules_to_save=None), "modules_to_save must be a list"),
    (lambda d: _edit_config(d, labels=[0, 1]), "distinct names"),
    (lambda d: _edit_config(d, labels=["pos", "pos"]), "distinct names"),
    (lambda d: _edit_config(d, num_labels=True), "num_labels must be a positive integer"),
    (lambda d: _edit_config(d, num_labels=0, labels=[]), "num_labels must be a positive integer"),
    (lambda d: _edit_config(d, task=7), "task must be a non-empty string"),
    (lambda d: _edit_config(d, base_model=None), "base_model must be a string"),
    (lambda d: _edit_config(d, metadata=[1]), "metadata must be a JSON object"),
    # format v2: the kind's fields
    (lambda d: _edit_config(d, format_version=3), "upgrade the library"),
    (lambda d: _edit_config(d, format_version="2"), "format version '2'"),
    (lambda d: _edit_config(d, format_version=0), "format version 0"),
    (lambda d: _edit_config(d, task_type="ranking"), "unknown task_type 'ranking'"),
    (lambda d: _edit_config(d, pooling={"mode": "mean", "normalize": True}), "pooling is only for embedding"),
    (lambda d: _edit_config(d, task_type="embedding"), "embedding adapter has num_labels 0"),
    (lambda d: _edit_config(d, task_type="token-classification", problem_type="regression"),
     "problem_type 'regression' for token-classification"),
    (lambda d: _edit_config(d, label_all_tokens="no"), "label_all_tokens"),
    (lambda d: (_edit_config(d, **{"task_type": None}), _edit_config(d, format_version=2)), "unknown task_type"),
])
def test_refuses_damaged_folders(trained, tmp_path, damage, needle):
    _, path = trained
    dst = _copy(path, tmp_path)
    damage(dst)
    with pytest.raises(AdapterFormatError, match=needle):
        read_adapter(dst)


def test_refuses_a_factor_shape_that_does_not_fit_the_model(trained, tmp_path, tiny_base):
    _, path = trained
    dst = _copy(path, tmp_path)
    def widen(t):
        key = next(k for k in t if k.endswith(".A"))
        t[key] = torch.zeros(t[key].shape[0], 48)
    _edit_tensors(dst, widen)
    with pytest.raises(AdapterFormatError, match="factors are for"):
        load_adapter(tiny_classifier(tiny_base, 2), dst)


def test_not_a_folder(tmp_path):
    with pytest.raises(AdapterFormatError, match="not an adapter folder"):
        read_adapter(tmp_path / "nope")


def test_save_refuses_duplicate_labels_before_writing(trained, tmp_path):
    model, _ = trained
    with pytest.raises(AdapterFormatError, match="distinct"):
        save_adapter(model, tmp_path / "dup", task="t", labels=["yes", "yes"])
    assert not (tmp_path / "dup").exists()


def test_save_needs_an_increlora_model(tiny_base, tmp_path):
    with pytest.raises(AdapterFormatError, match="apply_increlora"):
        save_adapter(tiny_classifier(tiny_base), tmp_path / "x", task="t")


def test_load_model_builds_the_head_from_the_adapter(trained, tiny_base):
    from increlora import load_model
    model, path = trained
    loaded = load_model(path)  # base model path read from the adapter
    assert not loaded.training and loaded.config.num_labels == 2
    torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=1e-6)
    half = load_model(path, str(tiny_base), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def _named_tensors(draw):
    """Tensors of mixed float dtypes, some with a NaN or inf, some with values at their dtype's range."""
    named = []
    for i in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(_DTYPES))
        t = torch.randn(draw(st.integers(1, 40)), generator=torch.Generator().manual_seed(i)).to(dtype)
        for _ in range(draw(st.integers(0, 3))):
            special = draw(st.sampled_from(["nan", "inf", "-inf", "max", "-max"]))
            value = torch.finfo(dtype).max * (-1 if special.startswith("-") else 1) if special.endswith("max") \
                else float(special)
            t[draw(st.integers(0, t.numel() - 1))] = value
        named.append((f"t{i}", t))
    return named


@settings(max_examples=150, deadline=None)
@given(_named_tensors())
def test_non_finite_screen_names_the_first_bad_tensor(named):
    # the reference: every tensor checked on its own, in order
    expected = next((name for name, t in named if not torch.isfinite(t).all()), None)
    assert _first_non_finite(named) == expected


# --- format v2: task kinds ---------------------------------------------------------------------------

def _as_version_1(dst):
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    cfg["format_version"] = 1
    del cfg["task_type"]
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))


def test_a_version_1_file_reads_as_sequence_classification(trained, tmp_path, tiny_base):
    model, path = trained
    assert read_adapter(path).config["format_version"] == 2 and read_adapter(path).task_type == TASK_TYPES[0]
    dst = _copy(path, tmp_path)
    _as_version_1(dst)
    adapter = read_adapter(dst)
    assert adapter.task_type == "sequence-classification" and adapter.pooling is None
    fresh = load_adapter(tiny_classifier(tiny_base, 2, seed=5), adapter).eval()
    torch.testing.assert_close(fresh(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=1e-6)


def test_a_version_2_file_without_task_type_is_refused(trained, tmp_path):
    _, path = trained
    dst = _copy(path, tmp_path)
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    del cfg["task_type"]
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="missing fields.*task_type"):
        read_adapter(dst)


@pytest.fixture(scope="module")
def kinds(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    return {"tokens": make_adapter(tiny_base, folder, "ner", 5, seed=3, task_type="token-classification"),
            "embed": make_adapter(tiny_base, folder, "search", seed=4, task_type="embedding",
                                  pooling={"mode": "cls", "normalize": False}),
            "seq": make_adapter(tiny_base, folder, "sst2", 2, seed=5)}


def test_token_classification_round_trip(kinds, tiny_base):
    adapter = read_adapter(kinds["tokens"])
    assert adapter.task_type == "token-classification" and adapter.labels == TAGS
    assert adapter.problem_type == "single_label_classification" and adapter.config["label_all_tokens"] is False
    assert adapter.modules_to_save == ["classifier"] and adapter.pooling is None
    reference = kind_model(tiny_base, "token-classification", 5, seed=3)  # the saved head and factors, fresh
    loaded = load_adapter(kind_model(tiny_base, "token-classification", 5, seed=77), adapter).eval()
    load_adapter(reference, adapter)
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
    assert loaded.config.id2label == dict(enumerate(TAGS))
    from increlora import load_model
    torch.testing.assert_close(load_model(kinds["tokens"])(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_embedding_from_a_bare_backbone_is_saved_under_task_model_names(kinds, tiny_base):
    adapter = read_adapter(kinds["embed"])
    assert adapter.task_type == "embedding" and adapter.pooling == {"mode": "cls", "normalize": False}
    assert adapter.num_labels == 0 and adapter.labels == [] and adapter.problem_type is None
    assert adapter.modules and all(name.startswith("bert.encoder.") for name in adapter.rank_pattern)
    # the bare backbone takes it back (prefix stripped) and so does load_model
    from increlora import load_model
    plain = load_adapter(kind_model(tiny_base, "embedding"), adapter).eval()
    ids = _ids()
    out = load_model(kinds["embed"])(input_ids=ids).last_hidden_state
    torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, out)
    assert not torch.allclose(out, kind_model(tiny_base, "embedding").eval()(input_ids=ids).last_hidden_state)


def test_every_kind_records_the_same_base_fingerprint(kinds, trained, tiny_base, other_tiny_base):
    # the pooler is left out for the kinds that do not use it, so one backbone checks all three
    fingerprints = {read_adapter(p).fingerprint for p in kinds.values()}
    assert len(fingerprints) == 1 and read_adapter(trained[1]).fingerprint in fingerprints
    with pytest.raises(BaseModelMismatchError):
        load_adapter(kind_model(other_tiny_base, "embedding"), kinds["embed"])
    with pytest.raises(BaseModelMismatchError):
        load_adapter(kind_model(other_tiny_base, "token-classification", 5), kinds["tokens"])


@pytest.mark.parametrize("kind, model_kind, needle", [
    ("tokens", "sequence-classification", "loads into an AutoModelForTokenClassification"),
    ("seq", "token-classification", "loads into an AutoModelForSequenceClassification"),
    ("embed", "sequence-classification", "loads into an AutoModel"),
])
def test_load_refuses_a_model_of_another_kind(kinds, tiny_base, kind, model_kind, needle):
    with pytest.raises(AdapterFormatError, match=needle):
        load_adapter(kind_model(tiny_base, model_kind, 5 if kind == "tokens" else 2), kinds[kind])


def _increlora(model):
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0,
                                           advance_learning=False))
    return model


@pytest.mark.parametrize("kind, kw, needle", [
    ("embedding", {}, "needs pooling"),
    ("embedding", {"pooling": {"mode": "max", "normalize": True}}, "pooling must be"),
    ("embedding", {"pooling": {"mode": "mean"}}, "pooling must be"),
    ("embedding", {"pooling": {"mode": "mean", "normalize": True}, "labels": ["a"]}, "has no labels"),
    ("token-classification", {"problem_type": "regression"}, "problem_type"),
    ("token-classification", {"label_all_tokens": 1}, "label_all_tokens"),
    ("sequence-classification", {"pooling": {"mode": "mean", "normalize": True}}, "pooling is for embedding"),
    ("ranking", {}, "task_type must be one of"),
])
def test_save_validates_the_kind_before_writing(tiny_base, tmp_path, kind, kw, needle):
    model = _increlora(kind_model(tiny_base, kind if kind in TASK_TYPES else "sequence-classification"))
    with pytest.raises(AdapterFormatError, match=needle):
        save_adapter(model, tmp_path / "x", task="t", task_type=kind, **kw)
    assert not (tmp_path / "x").exists()


def test_default_pooling_follows_the_sentence_transformers_config(tmp_path):
    assert default_pooling(tmp_path) == {"mode": "mean", "normalize": True}  # nothing declared
    assert default_pooling(None) == {"mode": "mean", "normalize": True}
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert default_pooling(tmp_path) == {"mode": "cls", "normalize": False}
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert default_pooling(tmp_path) == {"mode": "cls", "normalize": True}
