"""Settings of the HTTP service; every field documents itself and has the default `increlora-serve` uses."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class ServiceSettings(BaseModel):
    """What `create_app` needs besides the adapter bank."""

    model_config = ConfigDict(frozen=True, hide_input_in_errors=True)  # never echo an API key or token

    adapters: Path | None = Field(
        None, description="Folder of adapter folders. Admin `POST /v1/tasks` loads names from it; None: admin "
                          "loading is refused.")
    max_batch_size: int = Field(32, ge=1, description="Rows merged into one model call (a larger request runs alone).")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the first request of a batch waits for others.")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model; more are answered 503.")
    request_timeout: float = Field(30.0, gt=0, description="Seconds a prediction may take, queueing included (504).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin endpoints; None turns them off.")
    max_inputs: int = Field(64, ge=1, description="Inputs one request may carry (413 above).")
    max_body_bytes: int = Field(1_048_576, ge=1, description="Largest request body in bytes (413 above).")
    api_keys: tuple[SecretStr, ...] = Field(
        (), description="Keys accepted as 'Authorization: Bearer <key>' on the prediction and listing endpoints "
                        "(401 without one); empty: those endpoints are open. /health, /ready, /metrics stay open.")
    drain_seconds: float = Field(
        20.0, ge=0, description="On SIGTERM, how long work in flight may take to finish before the server stops.")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_blank(cls, keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        if any(not k.get_secret_value().strip() for k in keys):
            raise ValueError("an API key must not be empty or only whitespace")
        return keys
