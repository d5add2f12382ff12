import json

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model

from increlora import (
    AdapterFormatError,
    BaseModelMismatchError,
    IncreLoraConfig,
    export_peft,
    import_peft,
    load_adapter,
    save_adapter,
)
from tests.loop import train
from tests.tiny import make_tiny_base, tiny_classifier


def _ids():
    return torch.randint(5, 100, (4, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    cfg = IncreLoraConfig(target_avg_rank=2.5, top_h=3, init_warmup=3, interval=2, warmup_steps=2, lora_dropout=0.0)
    model, *_ = train(tiny_base, cfg, 14)
    path = tmp_path_factory.mktemp("a") / "task"
    save_adapter(model, path, task="task")
    return model.eval(), path


def test_export_loads_in_peft_with_the_same_logits(adapter, tiny_base, tmp_path):
    model, path = adapter
    export_peft(path, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"]
    peft_model = PeftModel.from_pretrained(tiny_classifier(tiny_base, 2, seed=5), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_model(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=1e-5)
    # and back: the same ranks and the same logits
    back = import_peft(tmp_path / "peft", tmp_path / "back", task="task")
    saved = json.loads((path / "adapter_config.json").read_text())
    assert back.rank_pattern == dict(saved["rank_pattern"])
    reloaded = load_adapter(tiny_classifier(tiny_base, 2, seed=6), tmp_path / "back").eval()
    torch.testing.assert_close(reloaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits, rtol=0, atol=1e-5)


def _peft_reference(tiny_base, folder, num_labels):
    return PeftModel.from_pretrained(tiny_classifier(tiny_base, num_labels, seed=8), folder).eval()


def test_import_lora_with_patterns_and_rslora(tiny_base, tmp_path):
    model = tiny_classifier(tiny_base, 3)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
                     rank_pattern={"bert.encoder.layer.0.attention.self.query": 4}, use_rslora=True,
                     alpha_pattern={"value": 3}, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "p")
    imported = import_peft(tmp_path / "p", tmp_path / "ours", task="three")
    assert imported.num_labels == 3 and imported.rank_pattern["bert.encoder.layer.0.attention.self.query"] == 4
    ours = load_adapter(tiny_classifier(tiny_base, 3, seed=1), tmp_path / "ours").eval()
    ref = _peft_reference(tiny_base, tmp_path / "p", 3)
    torch.testing.assert_close(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=0, atol=1e-5)


def test_import_adalora_keeps_pruned_ranks(tiny_base, tmp_path):
    model = tiny_classifier(tiny_base, 3, hidden_dropout_prob=0.0)
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=20, tinit=2, tfinal=2, deltaT=1,
                        target_modules=["query", "value"], modules_to_save=["classifier"])
    peft_model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = _ids(), torch.tensor([0, 1, 2, 0])
    for step in range(20):
        peft_model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "ada")
    imported = import_peft(tmp_path / "ada", tmp_path / "ours")
    assert sum(imported.rank_pattern.values()) < 4 * 4  # pruned components are dropped
    ours = load_adapter(tiny_classifier(tiny_base, 3, seed=1), tmp_path / "ours").eval()
    ref = _peft_reference(tiny_base, tmp_path / "ada", 3)
    torch.testing.assert_close(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=0, atol=1e-5)


def test_import_refuses_unsupported_adapters(tiny_base, tmp_path):
    with pytest.raises(AdapterFormatError, match="missing"):
        import_peft(tmp_path)
    dora = LoraConfig(r=2, target_modules=["query"], use_dora=True)
    get_peft_model(tiny_classifier(tiny_base), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="use_dora"):
        import_peft(tmp_path / "dora")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFormatError, match="pickle"):
        import_peft(tmp_path / "bin")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFormatError):
        import_peft(tmp_path / "ia3")


def test_import_refuses_labels_that_do_not_match_the_saved_head(tiny_base, tmp_path):
    config = LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_classifier(tiny_base, 2), config)
    model.save_pretrained(tmp_path / "two")
    with pytest.raises(AdapterFormatError, match="2 outputs but 3 labels"):
        import_peft(tmp_path / "two", labels=["negative", "neutral", "positive"])
    assert import_peft(tmp_path / "two", labels=["negative", "positive"]).labels == ["negative", "positive"]
    with pytest.raises(AdapterFormatError, match="distinct"):
        import_peft(tmp_path / "two", tmp_path / "out", labels=["same", "same"])
    assert not (tmp_path / "out").exists()


def test_import_with_base_model_records_its_fingerprint_and_checks_shapes(tiny_base, other_tiny_base, tmp_path):
    peft_model = get_peft_model(tiny_classifier(tiny_base, 2), LoraConfig(r=2, target_modules=["query", "value"],
                                                                          modules_to_save=["classifier"]))
    peft_model.save_pretrained(tmp_path / "p")
    # By path: the fingerprint of that model goes into the file, so the adapter loads on it ...
    imported = import_peft(tmp_path / "p", tmp_path / "ours", base_model=tiny_base)
    assert imported.fingerprint is not None and imported.base_model == str(tiny_base)
    load_adapter(tiny_classifier(tiny_base, 2, seed=3), tmp_path / "ours")
    # ... and is refused on another base model, where a plain import would only warn.
    with pytest.raises(BaseModelMismatchError):
        load_adapter(tiny_classifier(other_tiny_base, 2), tmp_path / "ours")
    assert import_peft(tmp_path / "p").fingerprint is None
    # A model object works too, with the same fingerprint.
    again = import_peft(tmp_path / "p", base_model=tiny_classifier(tiny_base, 2, seed=9))
    assert again.fingerprint == imported.fingerprint
    # A base model whose layers do not fit the adapter is refused at import.
    wide = tiny_classifier(make_tiny_base(tmp_path / "wide", hidden_size=48), 2)
    with pytest.raises(BaseModelMismatchError, match="query"):
        import_peft(tmp_path / "p", base_model=wide)


def test_import_maps_peft_token_and_feature_extraction_tasks_to_kinds(tiny_base, tmp_path):
    from transformers import AutoModel, AutoModelForTokenClassification

    torch.manual_seed(0)
    tokens = AutoModelForTokenClassification.from_pretrained(str(tiny_base), num_labels=3)
    get_peft_model(tokens, LoraConfig(r=2, target_modules=["query", "value"], task_type="TOKEN_CLS",
                                      init_lora_weights=False)).save_pretrained(tmp_path / "tok")
    imported = import_peft(tmp_path / "tok", tmp_path / "tok_ours", labels=["O", "B-X", "I-X"], base_model=tiny_base)
    assert imported.task_type == "token-classification" and imported.problem_type == "single_label_classification"
    assert imported.labels == ["O", "B-X", "I-X"] and imported.modules_to_save == ["classifier"]
    ref = PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(str(tiny_base), num_labels=3),
                                    tmp_path / "tok").eval()
    ours = load_adapter(AutoModelForTokenClassification.from_pretrained(str(tiny_base), num_labels=3),
                        tmp_path / "tok_ours").eval()
    torch.testing.assert_close(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=0, atol=1e-5)

    get_peft_model(AutoModel.from_pretrained(str(tiny_base)), LoraConfig(
        r=2, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION", init_lora_weights=False)
    ).save_pretrained(tmp_path / "emb")
    embedded = import_peft(tmp_path / "emb", tmp_path / "emb_ours", base_model=tiny_base,
                           pooling={"mode": "cls", "normalize": False})
    assert embedded.task_type == "embedding" and embedded.pooling == {"mode": "cls", "normalize": False}
    assert all(name.startswith("bert.encoder.") for name in embedded.rank_pattern)  # the task models' names
    assert embedded.fingerprint == imported.fingerprint  # one backbone checks both kinds
    ref = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny_base)), tmp_path / "emb").eval()
    ours = load_adapter(AutoModel.from_pretrained(str(tiny_base)), tmp_path / "emb_ours").eval()
    torch.testing.assert_close(ours(input_ids=_ids()).last_hidden_state, ref(input_ids=_ids()).last_hidden_state,
                               rtol=0, atol=1e-5)
    with pytest.raises(AdapterFormatError, match="has no labels"):
        import_peft(tmp_path / "emb", labels=["a"])
