import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from increlora import (
    AdapterFormatError,
    BaseModelMismatchError,
    IncreLoraConfig,
    load_adapter,
    read_adapter,
    save_adapter,
)
from increlora.adapter_file import CONFIG_NAME, WEIGHTS_NAME, _first_non_finite
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
