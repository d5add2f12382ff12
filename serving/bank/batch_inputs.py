"""Checking predict()'s inputs and tokenizing a batch of mixed single texts and text pairs."""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError

ModelInput = str | tuple[str, str]


def check_inputs(inputs: Any, tasks: Any) -> tuple[list[ModelInput], list[str]]:
    """Inputs as a list of str / (str, str); tasks one name for all, or one per input.

    A bare text or a bare tuple of two texts is one input (a pair); a list is always a list of inputs.
    """
    if isinstance(inputs, str) or (isinstance(inputs, tuple) and len(inputs) == 2
                                   and all(isinstance(s, str) for s in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, bytearray)) or len(inputs) == 0:
        raise InputError("predict: give a non-empty list of texts or (text, text_pair) pairs")
    items: list[ModelInput] = []
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            items.append(x)
        elif isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x):
            items.append((x[0], x[1]))
        else:
            raise InputError(f"predict: input {i} is {type(x).__name__} {str(x)[:50]!r}; "
                             "each input must be a text or a (text, text_pair) pair of texts")
    if isinstance(tasks, str):
        names = [tasks] * len(items)
    else:
        names = list(tasks) if isinstance(tasks, Sequence) else []
        if len(names) != len(items):
            raise InputError(f"predict: {len(items)} inputs but {len(names) if names else 'no list of'} tasks; "
                             "give one task name for all inputs or one per input")
        bad = [t for t in names if not isinstance(t, str)]
        if bad:
            raise InputError(f"predict: task names must be strings, got {bad[0]!r}")
    return items, names


@dataclass(frozen=True)
class TokenRow:
    """What a token-level answer needs of a single text's tokens (specials and all, no padding)."""

    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in the text
    special: list[int]  # 1 for [CLS], [SEP] and the like


def tokenize(tokenizer: Any, inputs: Sequence[ModelInput], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize singles and pairs (truncated to max_length), then right-pad all rows together."""
    return tokenize_with_offsets(tokenizer, inputs, max_length)[0]


def tokenize_with_offsets(tokenizer: Any, inputs: Sequence[ModelInput], max_length: int,
                          detailed: Collection[int] = ()) -> tuple[dict[str, torch.Tensor], dict[int, TokenRow]]:
    """As tokenize, and the TokenRow of each single text whose index is in `detailed` (a fast tokenizer's
    offset mapping)."""
    detailed = set(detailed)
    singles = [i for i, x in enumerate(inputs) if isinstance(x, str) and i not in detailed]
    pairs = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
    rows: list[dict[str, list[int]] | None] = [None] * len(inputs)
    details: dict[int, TokenRow] = {}
    marked = sorted(detailed)
    for idx, args in ((singles, ([inputs[i] for i in singles],)),
                      (pairs, ([inputs[i][0] for i in pairs], [inputs[i][1] for i in pairs])),
                      (marked, ([inputs[i] for i in marked],))):
        if not idx:
            continue
        more = {"return_offsets_mapping": True, "return_special_tokens_mask": True} if idx is marked else {}
        enc = tokenizer(*args, truncation=True, max_length=max_length, **more)
        for j, i in enumerate(idx):
            rows[i] = {k: v[j] for k, v in enc.items()}
            if more:
                details[i] = TokenRow(list(rows[i]["input_ids"]), [tuple(o) for o in rows[i]["offset_mapping"]],
                                      list(rows[i]["special_tokens_mask"]))
    keys = [k for k in rows[0] if k in ("input_ids", "attention_mask", "token_type_ids")]
    width = max(len(r["input_ids"]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = {}
    for k in keys:
        fill = pad_id if k == "input_ids" else 0
        batch[k] = torch.tensor([r[k] + [fill] * (width - len(r[k])) for r in rows], dtype=torch.long)
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                for r in rows], dtype=torch.long)
    return batch, details
