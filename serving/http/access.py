"""API keys of the prediction and listing endpoints: several may be valid at once (to rotate them), and
a key is compared in constant time against every one, so neither its value nor which key matched shows
in the answer's timing. The admin token (admin.py) is accepted too."""
from __future__ import annotations

import hashlib
import hmac

from .errors import ApiKeyError
from .settings import ServiceSettings


def check_api_key(settings: ServiceSettings, given: str | None) -> None:
    """Raise ApiKeyError unless the server has no API keys or `given` is one of them (or the admin token)."""
    accepted = [k.get_secret_value() for k in settings.api_keys]
    if not accepted:
        return
    if settings.admin_token is not None:
        accepted.append(settings.admin_token.get_secret_value())
    if not given:
        raise ApiKeyError("this server needs an API key: send the header 'Authorization: Bearer <key>'")
    if not matches_any(given, accepted):
        raise ApiKeyError("wrong API key")


def matches_any(given: str, accepted: list[str]) -> bool:
    """Whether `given` is in `accepted`, in a time that depends on neither (digests: equal lengths)."""
    digest = _digest(given)
    hits = [hmac.compare_digest(digest, _digest(key)) for key in accepted]  # every key, no early exit
    return any(hits)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
