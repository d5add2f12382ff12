"""Query/document pairs from the BBC News articles: a real retrieval task for embeddings and rerankers.

An article's headline (its first line) is the query and the rest of the article the document. The
articles are split as `bbc_news` splits them (80/10/10 by a seeded hash, stratified by topic,
identical articles together), so no article's text is in two splits of any BBC task. Rerankers
train on each query's document and NEGATIVES_TRAIN documents of other articles of the same topic
(a pair classification), and are scored on its document among NEGATIVES_EVAL such others.
"""
from __future__ import annotations

import random
from pathlib import Path

from increlora.assets import fetch_asset

from .data import DataError, Example, TaskData, TaskDefinition, grouped_split

NEGATIVES_TRAIN = 3
NEGATIVES_EVAL = 9
SPLITS = ("train", "validation", "test")


def read_articles(root: Path) -> list[tuple[str, str, str]]:
    """(topic, headline, body) of every article file, topics and files in sorted order."""
    out = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for path in sorted((root / topic).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252")  # a few BBC files are Windows-1252 (the pound sign)
            lines = [" ".join(line.split()) for line in text.splitlines()]
            lines = [line for line in lines if line]
            if len(lines) < 2:
                raise DataError(f"{path}: expected a headline and a body")
            out.append((topic, lines[0], " ".join(lines[1:])))
    return out


def split_articles(d: TaskDefinition, cache_dir) -> dict[str, list[tuple[str, str, str]]]:
    """bbc_news's split (the same keys: the article's text; the same strata: its topic), then each
    article once per split (the corpus holds some twice)."""
    articles = read_articles(fetch_asset("bbc_news", cache_dir))
    parts = grouped_split([f"{h} {b}" for _, h, b in articles], [t for t, _, _ in articles], d.split_fractions,
                          d.split_seed)
    out: dict[str, dict] = {s: {} for s in SPLITS}
    for article, j in zip(articles, parts):
        out[SPLITS[j]].setdefault(article[1:], article)
    return {s: list(rows.values()) for s, rows in out.items()}


def load_retrieval(d: TaskDefinition, cache_dir) -> TaskData:
    splits = split_articles(d, cache_dir)
    return TaskData(d, {s: [Example(h, b, 1.0) for _, h, b in rows] for s, rows in splits.items()})


def load_rerank(d: TaskDefinition, cache_dir) -> TaskData:
    splits = split_articles(d, cache_dir)
    data = TaskData(d)
    for split, rows in splits.items():
        negatives = NEGATIVES_TRAIN if split == "train" else NEGATIVES_EVAL
        rng = random.Random(f"{d.split_seed}:{split}")
        by_topic: dict[str, list[int]] = {}
        for i, (topic, _, _) in enumerate(rows):
            by_topic.setdefault(topic, []).append(i)
        pairs = []
        for i, (topic, headline, body) in enumerate(rows):
            others = [j for j in by_topic[topic] if j != i]
            group = f"{split}:{i}"
            pairs.append(Example(headline, body, 1, group=group))
            pairs += [Example(headline, rows[j][2], 0, group=group)
                      for j in rng.sample(others, min(negatives, len(others)))]
        data.splits[split] = pairs
    return data
