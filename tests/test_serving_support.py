"""The serving tests' helpers (tests/helpers/adapters.py) do what they say."""
from __future__ import annotations

from increlora import read_adapter
from tests.helpers.adapters import make_adapter


def test_make_adapter_has_heterogeneous_ranks_with_zeros(tiny_base, tmp_path):
    adapter = read_adapter(make_adapter(tiny_base, tmp_path, "t", 3, seed=4))
    ranks = list(adapter.rank_pattern.values())
    assert 0 in ranks and len(set(ranks)) > 2
    assert adapter.num_labels == 3 and adapter.labels == ["t_0", "t_1", "t_2"]
