"""The README tells the truth: its code blocks run here, in README order, on the tiny model.

A user who follows the README top to bottom works in one folder; so does the test. Python blocks are
exec'd in one namespace, shell commands run in that folder, and the curl commands go to the server
that the README's `increlora-serve` command started. Every fenced block is either run, with a check of
what it promises, or named in NOT_RUNNABLE with the reason; any other block fails the test. What the
suite cannot afford (the real backbones, the hub, thousands of steps) is swapped out by SUBSTITUTIONS
and TRAIN_FLAGS below, and a substitution whose README text is gone fails the test too. The options,
files and HTTP endpoints that the prose names are checked as well.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from increlora import load_adapter, read_adapter
from serving.cli import build_parser as serve_parser
from tests.helpers.kinds_data import write_conll, write_pairs, write_token_jsonl
from tests.helpers.server import start_server, stop, wait_ready
from tests.helpers.train_cli import write_csv
from tests.tiny import tiny_classifier
from training.cli import build_parser as train_parser

README = Path(__file__).resolve().parents[1] / "README.md"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Shell commands the suite does not run (matched by how they start), and why.
NOT_RUNNABLE = {
    "make demo": "fetches MiniLM and five datasets and trains for ~10 minutes; the blocks it is made of run here",
    "make test": "runs this very suite",
    ".venv/bin/torchrun": "tests/test_distributed.py runs increlora-train under torchrun with 2 CPU processes",
    ".venv/bin/increlora-train --tasks sms_spam,bbc_news,rotten_tomatoes --output /shared":
        "needs a Ray cluster with shared storage; tests/test_ray_training.py runs --ray on a local cluster",
    ".venv/bin/increlora-serve --adapters /shared": "needs a Ray cluster; tests/test_ray_serving.py serves "
                                                   "replicas on a local one and checks the options",
    "serve run": "Ray's own command; tests/test_ray_serving.py deploys the application it builds",
}

# (README text, what runs instead): applied to the code blocks; each must still be in one of them.
SUBSTITUTIONS = [
    ('"bert-base-uncased"', '"{tiny}"'),  # the Trainer example's backbone comes from the hub
    ("max_steps=2000", "max_steps=6"),
    ('device="cuda"', 'device="{device}"'),  # cuda where there is one
    ("--port 8000", "--port 0"),  # a free port, read from the server's log ...
    ("localhost:8000", "localhost:{port}"),  # ... and used by the curl commands
    ('"some/peft_lora_adapter"', '"peft/rotten_tomatoes"'),  # import back the adapter just exported
]

# Appended to every increlora-train command (argparse keeps an option's last value): the tiny model
# instead of MiniLM or DeBERTa, a few steps, and GLUE from a generated folder instead of the hub.
TRAIN_FLAGS = "--model {tiny} --glue-dir {glue} --steps 3 --batch-size 8 --max-length 16 --no-progress"
TRAIN_STEPS = 3

# Appended to every curl command: the HTTP status on a last line of its own.
CURL_FLAGS = ["--write-out", "\n%{http_code}"]

PROGRAMS = {".venv/bin/increlora-train": "train", ".venv/bin/increlora-serve": "serve", "curl": "curl"}
SHELLS = ("bash", "sh", "shell", "console")


@dataclass
class Step:
    kind: str  # python, train, serve, curl, skip, or uncovered
    code: str  # substitutions applied, placeholders such as {tiny} not yet filled
    where: str  # README.md:<line>
    line: int = 0
    note: str = ""  # why it is skipped or uncovered; for python, the PYTHON_CHECKS key


# -- the README's code blocks --------------------------------------------------------------------


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the first code line


def code_blocks(text: str) -> list[Block]:
    """Fenced blocks, and indented ones (lang "indented") so that they cannot hide from the test."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"(```|~~~)\s*([\w-]*)", lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
            blocks.append(Block(fence.group(2).lower(), "\n".join(lines[i + 1:end]) + "\n", i + 2))
            i = end + 1
        elif lines[i].startswith(("    ", "\t")) and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            end = next((j for j in range(i, len(lines)) if lines[j].strip() and not lines[j][0].isspace()), len(lines))
            blocks.append(Block("indented", "\n".join(lines[i:end]) + "\n", i + 1))
            i = end
        else:
            i += 1
    return blocks


def substituted(code: str) -> str:
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def fill(text: str, ctx: dict[str, str]) -> str:
    """Put in {tiny}, {port}, ...; only known names, so JSON braces stay as they are."""
    for key, value in ctx.items():
        text = text.replace("{" + key + "}", value)
    return text


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) for each command: continuation lines joined; comments and console output dropped."""
    out, n = [], block.line
    for chunk in re.split(r"(?<!\\)\n", block.code):  # a line with its continuation lines
        line, n = n, n + chunk.count("\n") + 1
        command = chunk.replace("\\\n", " ").strip()
        if block.lang == "console":
            if not command.startswith("$ "):
                continue
            command = command[2:].strip()
        if command and not command.startswith("#"):
            out.append((line, command))
    return out


def readme_steps(text: str) -> list[Step]:
    steps: list[Step] = []
    for block in code_blocks(text):
        code = substituted(block.code)
        if block.lang == "python":
            keys = [k for k in PYTHON_CHECKS if k in block.code]
            kind, note = ("python", keys[0]) if len(keys) == 1 else (
                "uncovered", f"python block with {len(keys)} of the PYTHON_CHECKS markers (needs exactly one)")
            steps.append(Step(kind, code, f"README.md:{block.line}", block.line, note))
        elif block.lang in SHELLS:
            for line, command in shell_commands(Block(block.lang, code, block.line)):
                steps.append(shell_step(command, f"README.md:{line}"))
        else:
            steps.append(Step("uncovered", block.code, f"README.md:{block.line}", block.line,
                              f"{block.lang or 'unlabelled'} block; fence code as ```python or ```bash"))
    return steps


def shell_step(command: str, where: str) -> Step:
    skip = [reason for start, reason in NOT_RUNNABLE.items() if command.startswith(start)]
    if skip:
        return Step("skip", command, where, note=skip[0])
    program = shlex.split(command, comments=True)[0]
    if program in PROGRAMS:
        return Step(PROGRAMS[program], command, where)
    return Step("uncovered", command, where, note=f"{program!r} is neither run here nor in NOT_RUNNABLE")


# -- checks, one per kind of example ---------------------------------------------------------------


def promised_outputs(text: str) -> list[str]:
    """The file names the README's "Outputs per task" bullet lists."""
    bullet = re.search(r"\*\*Outputs per task:\*\*(.*?)(?:\n- |\n\n)", text, re.DOTALL).group(1)
    return re.findall(r"`([\w.]+\.\w+)`", bullet)


def check_trainer_example(ns: dict, ctx: dict) -> None:
    assert ns["trainer"].state.global_step == 6
    adapter = read_adapter("bert/my_task")
    assert adapter.task == "my_task" and adapter.base_model == ctx["tiny"] and adapter.num_labels == 2
    assert sum(adapter.rank_pattern.values()) > len(adapter.rank_pattern), "no module grew past rank 1"


def check_bank_example(ns: dict, ctx: dict) -> None:
    bank, predictions = ns["bank"], ns["predictions"]
    assert bank.tasks == ["rotten_tomatoes", "bbc_news"] and not bank.load_errors
    assert bank.device.type == ctx["device"] and bank.dtype == torch.bfloat16
    assert [p["task"] for p in predictions] == ["rotten_tomatoes", "sms_spam"]
    for p in predictions:  # the README's "What predict returns" for a classification task
        assert p.keys() == {"task", "label", "score", "scores"} and p["label"] in p["scores"]


def check_peft_example(ns: dict, ctx: dict) -> None:
    from peft import PeftModel

    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(tiny_classifier(ctx["tiny"], 2, seed=1), "adapters/rotten_tomatoes").eval()
    theirs = PeftModel.from_pretrained(tiny_classifier(ctx["tiny"], 2, seed=2), "peft/rotten_tomatoes").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert read_adapter("adapters/imported").rank_pattern == read_adapter("adapters/rotten_tomatoes").rank_pattern


def check_openai_example(ns: dict, ctx: dict) -> None:
    """The client decoded the base64 it asked for into the server's own floats, and `nearest` is the argmax."""
    sent = {"model": "bbc_retrieval", "input": ns["texts"], "encoding_format": "float"}
    r = httpx.post(f"http://localhost:{ctx['port']}/v1/embeddings", json=sent, timeout=30)
    floats = [d["embedding"] for d in r.json()["data"]]
    assert len(ns["vectors"]) == 3 and all(v == pytest.approx(f, abs=1e-6) for v, f in zip(ns["vectors"], floats))
    assert all(sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4) for v in ns["vectors"])  # normalised
    dots = [sum(q * x for q, x in zip(ns["query"], v)) for v in ns["vectors"]]
    assert ns["nearest"] == dots.index(max(dots))


# A python block is run with the check whose marker it contains (exactly one).
PYTHON_CHECKS = {
    "IncreLoraTrainer(": check_trainer_example,
    "AdapterBank.load(": check_bank_example,
    "export_peft(": check_peft_example,
    "OpenAI(": check_openai_example,
}


# The tasks of other kinds that the README's HTTP examples use. Those the README's training commands
# have not made by the time the server starts are made here as tiny stand-ins (random adapters of the kind).
SERVED_KINDS = {"wnut16": "token-classification", "bbc_retrieval": "embedding", "bbc_rerank": "sequence-classification"}


def make_kind_standins(ctx: dict) -> list[str]:
    from tests.helpers.adapters import TAGS, make_adapter

    made = []
    for task, kind in SERVED_KINDS.items():
        if not Path("adapters", task, "adapter_config.json").is_file():
            make_adapter(Path(ctx["tiny"]), Path("adapters"), task, len(TAGS) if kind == "token-classification" else 2,
                         seed=len(made), task_type=kind)
            made.append(task)
    return made


def check_trained(argv: list[str], ctx: dict, outputs: list[str]) -> None:
    args = train_parser().parse_args(argv[1:])
    for folder in [args.output] if args.task else [args.output / t for t in args.tasks]:
        missing = [name for name in outputs if not (folder / name).is_file()]
        assert not missing, f"{folder}: no {missing}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["train_steps"] == TRAIN_STEPS and 0 <= metrics["validation"]["main"] <= 1
        assert read_adapter(folder).base_model == ctx["tiny"]


def check_response(argv: list[str], body: dict, text: str) -> None:
    url = next(a for a in argv if "localhost:" in a)
    path = urlsplit(url if "://" in url else "http://" + url).path
    sent = json.loads(argv[argv.index("-d") + 1]) if "-d" in argv else None
    if path == "/v1/predict":
        assert body["task"] == sent["task"] and len(body["predictions"]) == len(sent["inputs"]), text
        for p, x in zip(body["predictions"], sent["inputs"]):
            if "entities" in p:  # a token-classification task: spans inside the text
                assert all(0 <= e["start"] < e["end"] <= len(x) and e["entity_group"] for e in p["entities"]), text
            else:
                assert p["label"] in p["scores"], text
    elif path == "/v1/embeddings":
        dims = {len(d["embedding"]) for d in body["data"]}
        assert [d["index"] for d in body["data"]] == list(range(len(sent["input"]))) and len(dims) == 1, text
        assert body["model"] == sent["model"] and body["usage"]["prompt_tokens"] >= 2 * len(sent["input"]), text
    elif path == "/v1/rerank":
        scores = [r["relevance_score"] for r in body["results"]]
        assert len(scores) == sent["top_n"] and scores == sorted(scores, reverse=True), text
        assert all(r["document"]["text"] == sent["documents"][r["index"]] for r in body["results"]), text
    elif path == "/v1/tasks":
        served = sorted(p.name for p in Path("adapters").iterdir() if (p / "adapter_config.json").is_file())
        assert sorted(t["name"] for t in body["tasks"]) == served, text


def check_service_prose(text: str, base: str) -> None:
    """The endpoints the README lists answer, and a text pair is sent as it says."""
    endpoints = re.findall(r"`(/[a-z]+)`", text)
    assert {"/health", "/ready", "/metrics", "/docs"} <= set(endpoints)
    for path in endpoints:
        assert httpx.get(base + path, timeout=10).status_code == 200, path
    pair = json.loads(re.search(r"Send a text pair as `(.+?)`", text).group(1))
    r = httpx.post(f"{base}/v1/predict", json={"task": "rotten_tomatoes", "inputs": pair}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text


# -- the workspace of a user who follows the README -------------------------------------------------


def write_glue_sst2(folder: Path) -> Path:
    """A small GLUE folder in the official layout: SST-2/train.tsv and dev.tsv."""
    (folder / "SST-2").mkdir(parents=True)
    for name, n, seed in (("train.tsv", 80, 0), ("dev.tsv", 16, 1)):
        path = write_csv(folder / "SST-2" / name, n, seed)  # text,pos|neg rows, rewritten as GLUE has them
        rows = [line.rsplit(",", 1) for line in path.read_text().splitlines()[1:]]
        path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{int(y == 'pos')}\n" for text, y in rows))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    bin_dir = Path(sys.prefix) / "bin"
    if not (bin_dir / "increlora-train").is_file():
        pytest.fail(f"no console scripts in {bin_dir}: install the project (pip install -e .) to run the README")
    (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "train.csv", 200, 0)
    write_csv(tmp_path / "data" / "dev.csv", 40, 1)
    write_glue_sst2(tmp_path / "glue")
    write_pairs(tmp_path / "data" / "pairs.csv", 100, 0)  # the other kinds' training examples
    write_token_jsonl(tmp_path / "data" / "ner.jsonl", 100, 0)
    (tmp_path / "data" / "conll2003").mkdir()
    for name, seed in (("eng.train", 0), ("eng.testa", 1), ("eng.testb", 2)):
        write_conll(tmp_path / "data" / "conll2003" / name, 40, seed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the commands: the tiny model gains nothing from more threads
    return tmp_path


# -- the tests -------------------------------------------------------------------------------------


def test_every_code_block_is_run_or_listed_as_not_runnable():
    steps = readme_steps(README.read_text())
    uncovered = [f"{s.where}: {s.note}: {s.code.strip()[:80]}" for s in steps if s.kind == "uncovered"]
    assert not uncovered, "README code that this test neither runs nor lists in NOT_RUNNABLE:\n" + "\n".join(uncovered)
    kinds = {s.kind for s in steps}
    assert {"python", "train", "serve", "curl"} <= kinds, kinds


def test_every_substitution_and_listing_still_applies():
    text = README.read_text()
    code = "".join(b.code for b in code_blocks(text))
    stale = [old for old, _ in SUBSTITUTIONS if old not in code]
    stale += [start for start in NOT_RUNNABLE if not any(s.code.startswith(start) for s in readme_steps(text))]
    stale += [key for key in PYTHON_CHECKS if key not in code]
    assert not stale, f"no longer in the README's code: {stale}; update the tables in {Path(__file__).name}"
    assert len(promised_outputs(text)) >= 5


def test_every_option_the_readme_names_exists():
    from torch.distributed.run import get_args_parser as torchrun_parser

    parsers = (train_parser(), serve_parser(), torchrun_parser())
    options = {option for parser in parsers for option in parser._option_string_actions}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README.read_text()))
    unknown = sorted(named - options)
    assert named and not unknown, f"options in the README that no command has: {unknown}"


def test_every_file_the_readme_names_exists():
    root = README.parent
    named = set(re.findall(r"`([\w./-]+(?:/|\.py|\.md))`", README.read_text()))
    missing = sorted(n for n in named if not (root / n).exists() and not any(root.glob(f"*/{n}")))
    assert {"BENCHMARKS.md", "benchmarks/", "tests/loop.py"} <= named and not missing, missing


def test_the_readme_runs_top_to_bottom(workspace, tiny_base):
    text = README.read_text()
    ctx = {"tiny": str(Path(tiny_base).resolve()), "glue": str(workspace / "glue"), "device": DEVICE}
    namespace: dict = {"__name__": "__readme__"}
    servers: list[subprocess.Popen] = []
    try:
        for step in readme_steps(text):
            if step.kind == "python":
                # blank lines in front, so that a traceback points at the README's own line numbers
                exec(compile("\n" * (step.line - 1) + fill(step.code, ctx), "README.md", "exec"), namespace)
                PYTHON_CHECKS[step.note](namespace, ctx)
            elif step.kind == "train":
                argv = shlex.split(step.code, comments=True) + shlex.split(fill(TRAIN_FLAGS, ctx))
                r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, f"{step.where}: {step.code}\n{r.stderr[-3000:]}"
                check_trained(argv, ctx, promised_outputs(text))
            elif step.kind == "serve":
                make_kind_standins(ctx)
                argv = shlex.split(fill(step.code, ctx), comments=True)
                assert Path(argv[0]).is_file(), f"{step.where}: no {argv[0]}"
                # `python -m serving.cli`: what the console script runs, with its default dtype
                proc, base, _ = start_server(argv[1:], dtype=None)
                servers.append(proc)
                wait_ready(base)
                ctx["port"] = base.rsplit(":", 1)[1]
                check_service_prose(text, base)
            elif step.kind == "curl":
                argv = shlex.split(fill(step.code, ctx), comments=True)
                r = subprocess.run(argv + CURL_FLAGS, check=False, capture_output=True, text=True, timeout=60)
                out, _, status = r.stdout.rpartition("\n")
                assert r.returncode == 0 and status == "200", f"{step.where}: {step.code}\n{r.stdout}{r.stderr}"
                check_response(argv, json.loads(out), out)
    finally:
        codes = [stop(proc) for proc in servers]
    assert servers and all(code in (0, -signal.SIGTERM) for code in codes), codes
