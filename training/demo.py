"""`make demo`: train a task of each kind on the embedded MiniLM backbone, serve them all, query them.

    python -m training.demo [--adapters adapters] [--steps 250] [--no-serve]

Five adapters on one backbone: three classifiers (rotten_tomatoes, sms_spam, bbc_news), an
embedding task (bbc_retrieval) and an entity tagger (wnut16). Training is short (a few minutes per
task on a 2-core CPU); finished adapters are reused, and a run stopped with Ctrl-C continues where it
stopped. Then `increlora-serve` runs on a free loopback port and answers mixed requests: every
example shown comes from its task's test split, with the true answer beside the served one.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cli import main as train

TASKS = "rotten_tomatoes,sms_spam,bbc_news"  # the classifiers
SEARCH_TASK, ENTITY_TASK = "bbc_retrieval", "wnut16"
# the other kinds' runs: (task, steps, learning rate, max length); the tagger's is the quality
# benchmark's IncreLoRA run at its rate chosen on validation (BENCHMARKS.md)
KIND_RUNS = ((SEARCH_TASK, 100, "5e-4", 64), (ENTITY_TASK, 240, "1e-3", 64))
ALL_TASKS = (*TASKS.split(","), SEARCH_TASK, ENTITY_TASK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_ready(base: str, proc: subprocess.Popen, limit_s: float = 300.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"increlora-serve exited with code {proc.returncode}")
        try:
            _call(f"{base}/ready", timeout=2.0)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"increlora-serve not ready after {limit_s:.0f} s")


def classification_examples(per_task: int = 2) -> list[tuple[str, str, str]]:
    """(task, text, true label): the first short test example of each of the task's first classes."""
    from .tasks import load_task

    out = []
    for task in TASKS.split(","):
        data = load_task(task)
        names = data.definition.label_names
        for label in range(min(per_task, len(names))):
            e = min((e for e in data.splits["test"] if e.label == label), key=lambda e: (len(e.text) > 160, 0))
            out.append((task, e.text, names[label]))
    return out


def entity_examples(n: int = 5) -> list[tuple[str, list[str]]]:
    """(tweet, its true entities as "type: words") of the first test tweets that hold an entity."""
    from .tasks import load_task

    out = []
    for e in load_task(ENTITY_TASK).splits["test"]:
        spans = []
        for word, tag in zip(e.tokens, e.tags):
            if tag.startswith("B-"):
                spans.append([tag[2:], word])
            elif tag.startswith("I-") and spans:
                spans[-1][1] += " " + word
        if spans:
            out.append((" ".join(e.tokens), [f"{t}: {w}" for t, w in spans]))
        if len(out) == n:
            break
    return out


def search_examples(n: int = 3) -> tuple[list[str], list[str]]:
    """(queries, corpus): test headlines, and every test article's text (query i's own is corpus[i])."""
    from .tasks import load_task

    rows = load_task(SEARCH_TASK).splits["test"]
    return [e.text for e in rows[:n]], [e.text_pair for e in rows]


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def show_classifications(base: str) -> None:
    examples = classification_examples()
    print("\nclassifications (test-split examples, sent at once so they share batches):")
    with ThreadPoolExecutor(len(examples)) as pool:
        answers = pool.map(lambda ex: _call(f"{base}/v1/predict", {"task": ex[0], "inputs": [ex[1]]}), examples)
        for (task, text, truth), answer in zip(examples, answers):
            pred = answer["predictions"][0]
            got = pred.get("label", pred.get("value"))
            mark = "right" if str(got) == truth else f"WRONG, true {truth}"
            print(f"  [{task:15s}] {got!s:13s} ({mark}, score {pred.get('score', float('nan')):.3f})  {_short(text)}")


def show_search(base: str) -> None:
    queries, corpus = search_examples()
    vectors = []
    for start in range(0, len(corpus), 32):
        answer = _call(f"{base}/v1/embeddings", {"model": SEARCH_TASK, "input": corpus[start:start + 32]})
        vectors += [d["embedding"] for d in answer["data"]]
    found = _call(f"{base}/v1/embeddings", {"model": SEARCH_TASK, "input": queries})["data"]
    print(f"\nsemantic search ({SEARCH_TASK}: test headlines against all {len(corpus)} test articles):")
    for i, (query, q) in enumerate(zip(queries, found)):
        scores = [sum(a * b for a, b in zip(q["embedding"], v)) for v in vectors]
        best = max(range(len(scores)), key=scores.__getitem__)
        rank = 1 + sum(s > scores[i] for s in scores)
        mark = "its own article" if best == i else f"another article; its own ranks {rank}"
        print(f"  {_short(query, 50)!r}\n      -> {_short(corpus[best])}  ({mark})")


def show_entities(base: str) -> None:
    examples = entity_examples()
    answer = _call(f"{base}/v1/predict", {"task": ENTITY_TASK, "inputs": [t for t, _ in examples]})
    print(f"\nentities ({ENTITY_TASK}: test tweets, true entities beside the served ones):")
    right = extra = 0
    for (text, truth), pred in zip(examples, answer["predictions"]):
        got = [f"{e['entity_group']}: {text[e['start']:e['end']]}" for e in pred["entities"]]
        right, extra = right + sum(g in truth for g in got), extra + sum(g not in truth for g in got)
        print(f"  {_short(text)}\n      served {got}\n      true   {truth}")
    print(f"  served {right} of the {sum(len(t) for _, t in examples)} true entities exactly, and {extra} others")


def serve_and_query(adapters: str) -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"starting increlora-serve on {base} ...", flush=True)
    # bfloat16 where the processor has it natively: labels as float32's on the three tasks (BENCHMARKS.md)
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "--adapters", adapters, "--dtype", "auto",
                             "--host", "127.0.0.1", "--port", str(port)])
    try:
        _wait_ready(base, proc)
        show_classifications(base)
        show_search(base)
        show_entities(base)
        print("\nper task:")
        for task in ALL_TASKS:
            folder = Path(adapters) / task
            metrics = json.loads((folder / "metrics.json").read_text())
            test = metrics.get("test", metrics)
            print(f"  {task:15s} test {json.dumps(test)[:120]}\n"
                  f"  {'':15s} rank heatmap: {folder / 'ranks_heatmap.png'}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("service stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="adapters")
    ap.add_argument("--steps", type=int, default=250, help="steps of each classifier")
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args(argv)
    # The growth schedule is derived from the run: the budget (36 modules, avg rank 2) is spent by a third.
    common = ["--output", args.adapters, "--resume", "--batch-size", "16", "--save-steps", "50"]
    code = train(["--tasks", TASKS, *common, "--steps", str(args.steps), "--max-length", "64", "--lr", "1e-3"])
    for task, steps, lr, max_length in KIND_RUNS:
        if code == 0:
            code = train(["--tasks", task, *common, "--steps", str(steps), "--max-length", str(max_length),
                          "--lr", lr])
    if code != 0 or args.no_serve:
        return code
    return serve_and_query(args.adapters)


if __name__ == "__main__":
    sys.exit(main())
