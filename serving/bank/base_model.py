"""Loading the frozen base model and its tokenizer for the bank.

The checkpoint is a backbone without the task head, which comes from each adapter, so transformers'
load report (the head MISSING, "Consider training") is held back while the bank loads it. Anything
else the report would name, backbone weights missing from the checkpoint or weights it has that the
model does not use, is logged as the bank's own warning.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_REPORT_LOGGER = "transformers.modeling_utils"  # where from_pretrained logs its LOAD REPORT


class _HoldReport(logging.Filter):
    """Keeps back the load report logged by one thread."""

    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextlib.contextmanager
def held_load_report() -> Iterator[None]:
    """Hold back this thread's load report; show it after all if loading fails (the error refers to it)."""
    source = logging.getLogger(_REPORT_LOGGER)
    hold = _HoldReport(threading.get_ident())
    source.addFilter(hold)
    try:
        yield
    except BaseException:
        source.removeFilter(hold)
        for record in hold.held:
            source.handle(record)
        raise
    finally:
        source.removeFilter(hold)


def load_base_model(name: str, path: str) -> tuple[nn.Module, Any, list[str]]:
    """The sequence classifier and tokenizer at `path`, and the parameters its checkpoint lacked."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with held_load_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    missing = sorted(info.get("missing_keys") or ())
    warn_about_checkpoint(name, model, missing, sorted(info.get("unexpected_keys") or ()))
    return model, tokenizer, missing


def warn_about_checkpoint(name: str, model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Log what the checkpoint lacked besides the task head, and what it had that the model does not use."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_backbone = bool(prefix) and getattr(model, prefix, None) not in (None, model)
    backbone_missing = [k for k in missing if not has_backbone or k.startswith(prefix + ".")]
    if backbone_missing:
        logger.warning("base model %s: its checkpoint lacks %s (initialised at random); only adapters that save "
                       "these modules can be served on it", name, backbone_missing[:8])
    if unexpected:
        logger.warning("base model %s: its checkpoint has weights the model does not use: %s", name, unexpected[:8])
