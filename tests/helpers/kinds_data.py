"""Generated files for the embedding and token-classification kinds, learnable by the tiny model."""
from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ("sport team game", "vote politics", "market money business", "phone computer tech", "music film actor")
FILLER = "the a is was very really this that of to in".split()
ENTITY_WORDS = {"PER": ("she", "he", "i"), "LOC": ("market", "team"), "ORG": ("computer", "phone")}


def write_pairs(path: Path, n: int, seed: int, negatives: bool = False) -> Path:
    """`anchor,positive[,negative]`: the positive shares the anchor's topic words; the negative another topic's."""
    rng = random.Random(seed)
    lines = ["anchor,positive" + (",negative" if negatives else "")]
    for i in range(n):
        t, other = rng.sample(range(len(TOPICS)), 2)
        anchor = " ".join(rng.sample(TOPICS[t].split(), 1) + rng.choices(FILLER, k=3) + [str(i % 10)])
        positive = " ".join(TOPICS[t].split() + rng.choices(FILLER, k=4) + [str(i % 10)])
        row = [anchor, positive]
        if negatives:
            row.append(" ".join(TOPICS[other].split() + rng.choices(FILLER, k=4)))
        lines.append(",".join(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_scored(path: Path, n: int, seed: int) -> Path:
    """`sentence1,sentence2,score` with scores 0-5: 5 for one topic, 0 for two."""
    rng = random.Random(seed)
    lines = ["sentence1,sentence2,score"]
    for _ in range(n):
        t, u = rng.randrange(len(TOPICS)), rng.randrange(len(TOPICS))
        a = " ".join(TOPICS[t].split()[:1] + rng.choices(FILLER, k=3))
        b = " ".join(TOPICS[u].split() + rng.choices(FILLER, k=3))
        lines.append(f"{a},{b},{5.0 if t == u else 0.0}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tagged_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Sentences of filler words and entities (one or two words, IOB2) whose words give their type away."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 4)):
            tokens += rng.choices(FILLER, k=rng.randint(1, 2))
            tags += ["O"] * (len(tokens) - len(tags))
            kind = rng.choice(sorted(ENTITY_WORDS))
            words = rng.choices(ENTITY_WORDS[kind], k=rng.randint(1, 2))
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        out.append((tokens, tags))
    return out


# Entities whose words say their tag outright: a B- word and an I- word of each type, each split by the
# tiny tokenizer into a distinctive first piece and "##z" pieces, so only labels on the first piece teach.
NAMED = {"PER": (("shezz", "hezz"), ("youzz", "wezz")), "LOC": (("marketzz",), ("teamzz",)),
         "ORG": (("computerzz",), ("phonezz",))}


def named_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Filler words and one- or two-word entities of NAMED: a tagger that learned can be exact."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 2)):  # at most 16 pieces: none is cut at the tests' --max-length 24
            tokens += rng.choices(FILLER, k=rng.randint(1, 2))
            tags += ["O"] * (len(tokens) - len(tags))
            kind = rng.choice(sorted(NAMED))
            first, rest = NAMED[kind]
            tokens += [rng.choice(first)] + rng.choices(rest, k=rng.randint(0, 1))
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(tokens) - len(tags) - 1)
        out.append((tokens, tags))
    return out


def write_token_jsonl(path: Path, n: int, seed: int, sentences=tagged_sentences) -> Path:
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sentences(n, seed)))
    return path


def to_iob1(tags: list[str]) -> list[str]:
    """The original CoNLL-2003 scheme: I- everywhere, B- only where an entity follows one of its type."""
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") and not (i and tags[i - 1] != "O" and tags[i - 1][2:] == tag[2:]):
            tag = "I-" + tag[2:]
        out.append(tag)
    return out


def write_conll(path: Path, n: int, seed: int, iob1: bool = True) -> Path:
    """A file in the CoNLL-2003 layout: -DOCSTART-, then `word POS chunk NER` lines, blank between sentences."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in tagged_sentences(n, seed):
        for word, tag in zip(tokens, to_iob1(tags) if iob1 else tags):
            lines.append(f"{word} NN I-NP {tag}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path
