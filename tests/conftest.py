import logging

import pytest

from tests.helpers.http_adapters import make_http_base
from tests.tiny import make_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Folder of a tiny pretrained-like BERT (hidden 32, 2 layers) with its tokenizer."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_base(tmp_path_factory):
    """Same architecture, other weights: for base-model mismatch tests."""
    return make_tiny_base(tmp_path_factory.mktemp("other_tiny_base"), seed=1)


@pytest.fixture(scope="session")
def http_base(tmp_path_factory):
    """Folder of the tiny base model with a tokenizer that knows its words (see make_http_base)."""
    return make_http_base(tmp_path_factory.mktemp("http_base"))


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
