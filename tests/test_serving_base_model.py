"""Loading the bank's base model: transformers' report of the missing task head is held back, anything
else it would report becomes the bank's own warning, and a failed load still shows the report."""
from __future__ import annotations

import logging

import pytest
from transformers import AutoModelForSequenceClassification, BertModel

from serving import AdapterBank
from serving.bank.base_model import held_load_report
from tests.tiny import tiny_bert_config


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """What transformers logs at warning level and above (the suite otherwise keeps it at ERROR)."""
    source, records = logging.getLogger("transformers.modeling_utils"), Records()
    level = source.level
    source.setLevel(logging.WARNING)
    source.addHandler(records)
    yield records.messages
    source.removeHandler(records)
    source.setLevel(level)


def test_the_missing_head_is_not_reported(tiny_base, transformers_log, caplog):
    AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=2)
    assert any("LOAD REPORT" in m for m in transformers_log)  # what a plain from_pretrained shows
    transformers_log.clear()
    with caplog.at_level(logging.WARNING, logger="serving"):
        bank = AdapterBank.load([], base_model=str(tiny_base), dtype="float32")
    assert bank.tasks == [] and not any("LOAD REPORT" in m for m in transformers_log), transformers_log
    assert not [r for r in caplog.records if r.name.startswith("serving.bank.base_model")]


def test_backbone_weights_missing_from_the_checkpoint_are_a_warning(tmp_path, tiny_base, transformers_log, caplog):
    BertModel(tiny_bert_config(), add_pooling_layer=False).save_pretrained(tmp_path)  # no pooler
    for path in tiny_base.iterdir():  # the tokenizer's files
        if path.name not in ("config.json", "model.safetensors"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="serving"):
        AdapterBank.load([], base_model=str(tmp_path), dtype="float32")
    warned = [r.getMessage() for r in caplog.records if r.name == "serving.bank.base_model"]
    assert len(warned) == 1 and "bert.pooler.dense.weight" in warned[0] and "classifier" not in warned[0], warned
    assert not any("LOAD REPORT" in m for m in transformers_log)


def test_a_failed_load_still_shows_the_report(transformers_log):
    source = logging.getLogger("transformers.modeling_utils")
    with pytest.raises(RuntimeError), held_load_report():
        source.warning("BertForSequenceClassification LOAD REPORT from: somewhere\nMISMATCH ...")
        assert transformers_log == []
        raise RuntimeError("ignore_mismatched_sizes is False: see the report above")
    assert len(transformers_log) == 1 and "MISMATCH" in transformers_log[0]
