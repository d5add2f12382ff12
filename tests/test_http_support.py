"""The HTTP tests' helpers (tests/helpers/fake_bank.py, http_adapters.py) do what they say."""
from __future__ import annotations

import pytest

from tests.helpers.fake_bank import FakeBank
from tests.helpers.http_adapters import make_tiny_adapters


def test_fake_bank_answers_depend_on_task_and_input():
    bank = FakeBank()
    a, b, c = bank.predict(["x", "x", ("x", "y")], ["sst2", "topic", "sst2"])
    assert a["task"] == "sst2" and set(a["scores"]) == {"negative", "positive"}
    assert abs(sum(a["scores"].values()) - 1) < 1e-9 and a["score"] == max(a["scores"].values())
    assert set(b["scores"]) == {"business", "sport", "tech"}
    assert a["scores"] != c["scores"]
    with pytest.raises(KeyError):
        bank.predict(["x"], ["nope"])


def test_the_http_base_tokenizes_words_and_its_adapters_differ_per_task(tmp_path, http_base):
    from transformers import AutoTokenizer

    from increlora.adapter_file import read_adapter

    ids = AutoTokenizer.from_pretrained(str(http_base))("good film")["input_ids"]
    assert len(ids) == 4 and AutoTokenizer.from_pretrained(str(http_base)).unk_token_id not in ids
    make_tiny_adapters(tmp_path, http_base, {"one": 2, "two": 2})
    one, two = read_adapter(tmp_path / "one"), read_adapter(tmp_path / "two")
    assert one.task == "one" and one.labels == ["one_0", "one_1"]
    name = next(iter(one.modules))
    assert not one.modules[name].E.eq(two.modules[name].E).all()
    assert one.modules[name].E.abs().sum() > 0
