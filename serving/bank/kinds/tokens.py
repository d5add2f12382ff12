"""Token classification (NER, IOB2 tags): the task's linear head on every token's last hidden state;
answers are entity spans with character offsets into the text, grouped as transformers'
token-classification pipeline does with aggregation_strategy="first": a word's tag is its first
sub-token's, consecutive words of one type (B-X then I-X ...) form one entity, whose score is the
mean of its words' scores; "O" words are left out. Single texts only.

    {"task": str, "entities": [{"entity_group": str, "score": float, "word": str, "start": int, "end": int}]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from increlora.adapter_file import TOKEN_CLASSIFICATION, Adapter

from ..base_layout import BaseLayout
from ..batch_inputs import ModelInput, TokenRow
from ..errors import AdapterShapeError, InputError
from .base import Kind, RowOutput

if TYPE_CHECKING:
    from ..task_adapter import TaskAdapter


def _head(adapter: Adapter, layout: BaseLayout, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """The saved head outside the backbone, as one nn.Linear [hidden -> num_labels]."""
    outside = [m for m in adapter.modules_to_save if not layout.in_backbone(m)]
    where = adapter.path
    if len(outside) != 1:
        raise AdapterShapeError(f"{where}: a token-classification adapter saves its head as one linear module "
                                f"outside the backbone (e.g. 'classifier'); it saves {outside}")
    name = outside[0]
    tensors = {k[len(name) + 1:]: t for k, t in adapter.saved.items() if k.startswith(name + ".")}
    weight, bias = tensors.get("weight"), tensors.get("bias")
    want = (adapter.num_labels, layout.hidden_size)
    if weight is None or set(tensors) - {"weight", "bias"} or tuple(weight.shape) != want \
            or (bias is not None and tuple(bias.shape) != want[:1]):
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        raise AdapterShapeError(f"{where}: the token head {name!r} must be a linear layer with weight {want} "
                                f"(num_labels x hidden) and an optional bias; it has {shapes}")
    head = nn.Linear(want[1], want[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass
class _Word:
    tag: str
    score: float
    tokens: list[str] = field(default_factory=list)
    start: int = 0
    end: int = 0


def _words(text: str, scores: torch.Tensor, row: TokenRow, labels: tuple[str, ...], tokenizer: Any) -> list[_Word]:
    """Tokens fused into words; a word takes its first token's best tag and score. scores [tokens, labels]."""
    # a word-aware tokenizer (WordPiece's "##", BPE's) shows a sub-token by its text being longer than its span
    model = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
    word_aware = bool(getattr(model, "continuing_subword_prefix", None))
    best_scores, best = scores.max(dim=-1)
    words: list[_Word] = []
    for t, token_id in enumerate(row.ids):
        if row.special[t]:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        start, end = row.offsets[t]
        span = text[start:end]
        if word_aware:
            subword = len(token) != len(span)
        else:  # a token glued to the previous character continues its word
            subword = start > 0 and " " not in text[start - 1:start + 1]
        if token_id == tokenizer.unk_token_id:
            token, subword = span, False
        if subword and words:
            words[-1].tokens.append(token)
            words[-1].end = end
        else:
            words.append(_Word(labels[int(best[t])], float(best_scores[t]), [token], start, end))
    return words


def _split_tag(tag: str) -> tuple[str, str]:
    """("B" | "I", type); a tag without a B-/I- prefix continues like I-."""
    return (tag[0], tag[2:]) if tag.startswith(("B-", "I-")) else ("I", tag)


def entities(text: str, scores: torch.Tensor, row: TokenRow, labels: tuple[str, ...],
             tokenizer: Any) -> list[dict[str, Any]]:
    """Entity spans of one text from its tokens' probabilities [tokens, labels]."""
    groups: list[list[_Word]] = []
    for word in _words(text, scores, row, labels, tokenizer):
        bi, kind = _split_tag(word.tag)
        if groups and bi != "B" and kind == _split_tag(groups[-1][-1].tag)[1]:
            groups[-1].append(word)
        else:
            groups.append([word])
    found = []
    for group in groups:
        label = group[0].tag.split("-", 1)[-1]
        if label == "O":
            continue
        words = [tokenizer.convert_tokens_to_string(w.tokens) for w in group]
        found.append({"entity_group": label, "score": sum(w.score for w in group) / len(group),
                      "word": tokenizer.convert_tokens_to_string(words), "start": group[0].start,
                      "end": group[-1].end})
    return found


class TokenClassification(Kind):
    task_type = TOKEN_CLASSIFICATION
    per_token = True
    needs_offsets = True

    def output_part(self, adapter: Adapter, layout: BaseLayout, device: torch.device, dtype: torch.dtype) -> Any:
        return _head(adapter, layout, device, dtype)

    def check_input(self, task: TaskAdapter, index: int, item: ModelInput) -> None:
        if not isinstance(item, str):
            raise InputError(f"predict: input {index} is a pair of texts, but task {task.name!r} is a "
                             f"token-classification task: it takes single texts")

    def rows(self, task: TaskAdapter, hidden: torch.Tensor | None, mask: torch.Tensor,
             logits: torch.Tensor | None) -> torch.Tensor:
        return task.output(hidden)  # [n, seq, num_labels]

    def answer(self, task: TaskAdapter, row: RowOutput, tokenizer: Any) -> dict[str, Any]:
        scores = torch.softmax(row.values.float(), dim=-1)
        return {"task": task.name, "entities": entities(row.text, scores, row.token_row, task.labels, tokenizer)}
