"""increlora-train end to end on the tiny model and generated CSV files: outputs, resume, bad input."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from increlora import BaseModelMismatchError, IncreLoraConfig, load_adapter, model_fingerprint, read_adapter
from increlora.config import CONFIG_VERSION
from tests.helpers.train_cli import FAST, InterruptAt, assert_same_adapter, write_csv
from tests.tiny import tiny_classifier
from training.cli import build_parser, main, options_from


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("csv")
    return {"train": write_csv(d / "train.csv", 320, 0), "validation": write_csv(d / "dev.csv", 48, 1),
            "test": write_csv(d / "test.csv", 48, 2)}


def cli(tiny_base, files, out, *extra, callbacks=None) -> int:
    argv = ["--task", "toy", "--train", str(files["train"]), "--validation", str(files["validation"]),
            "--test", str(files["test"]), "--model", str(tiny_base), "--output", str(out), *FAST, *extra]
    return main(argv, callbacks=callbacks)


@pytest.fixture(scope="module")
def finished(tiny_base, files, tmp_path_factory):
    """finished(method): the folder of a whole run of FAST with that method, trained once for the module's
    tests that read one or compare with one; a test that changes a run works on a copy."""
    runs: dict[str, Path] = {}

    def run(method: str = "increlora") -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"finished_{method}") / method
            assert cli(tiny_base, files, out, *(("--method", method) if method != "increlora" else ())) == 0
            runs[method] = out
        return runs[method]
    return run


def test_accuracy(tiny_base, adapter_dir: Path, test_csv: Path) -> float:
    """Accuracy of the saved adapter loaded into a fresh base model: what serving would see."""
    adapter = read_adapter(adapter_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_base), num_labels=adapter.num_labels)
    load_adapter(model, adapter, check_base=adapter.fingerprint is not None)
    rows = [line.rsplit(",", 1) for line in test_csv.read_text().splitlines()[1:]]
    enc = AutoTokenizer.from_pretrained(str(tiny_base))([t for t, _ in rows], padding=True, truncation=True,
                                                         max_length=24, return_tensors="pt")
    with torch.no_grad():
        pred = model.eval()(**enc).logits.argmax(-1).tolist()
    return sum(adapter.labels[p] == y for p, y in zip(pred, (y for _, y in rows))) / len(rows)


test_accuracy.__test__ = False


def test_train_outputs_and_resume_after_ctrl_c(tiny_base, files, finished, tmp_path, capsys):
    full = finished("increlora")
    names = {p.name for p in full.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "rank_pattern.json",
            "ranks_heatmap.png", "rank_growth.png", "train_log.json"} <= names
    assert "checkpoints" not in names
    for png in ("ranks_heatmap.png", "rank_growth.png"):
        assert (full / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((full / "metrics.json").read_text())
    adapter = read_adapter(full)
    ranks = json.loads((full / "rank_pattern.json").read_text())
    assert ranks == adapter.rank_pattern and len(ranks) == 12
    assert metrics["final_total_rank"] == sum(ranks.values()) == metrics["growth"]["budget"] == 24
    assert metrics["trainable_parameters"] == adapter.parameter_count()  # active factors + head
    assert metrics["train_steps"] == 28 and metrics["train_seconds"] > 0
    assert adapter.base_model == str(Path(tiny_base).resolve()) and adapter.labels == ["neg", "pos"]
    for split in ("validation", "test"):
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0 and metrics[split]["main"] == metrics[split]["accuracy"]
    assert test_accuracy(tiny_base, full, files["test"]) == pytest.approx(metrics["test"]["accuracy"])

    # Ctrl-C at step 11 leaves a checkpoint; the folder is then refused without --resume.
    part = tmp_path / "part"
    assert cli(tiny_base, files, part, callbacks=[InterruptAt(11)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert (part / "checkpoints" / "checkpoint-11").is_dir()
    assert cli(tiny_base, files, part) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(tiny_base, files, part, "--resume") == 0
    assert json.loads((part / "metrics.json").read_text())["resumed_from_step"] == 11
    assert_same_adapter(full, part)
    assert cli(tiny_base, files, part, "--overwrite") == 0


def test_resume_refuses_changed_options(tiny_base, files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_base, files, out, callbacks=[InterruptAt(3)]) == 130
    assert cli(tiny_base, files, out, "--resume", "--lr", "1e-3") == 1
    assert "learning_rate" in capsys.readouterr().err
    # another number of processes changes the global batch: refused too
    run_file = out / "checkpoints" / "run.json"
    run = json.loads(run_file.read_text())
    assert run["processes"] == 1
    run_file.write_text(json.dumps({**run, "processes": 2}))
    assert cli(tiny_base, files, out, "--resume") == 1
    assert "processes" in capsys.readouterr().err
    # a run file from before the count was kept: the checkpoint's per-process RNG files tell
    del run["processes"]
    run_file.write_text(json.dumps(run))
    checkpoint = next((out / "checkpoints").glob("checkpoint-*"))
    for rank in range(2):
        (checkpoint / f"rng_state_{rank}.pth").write_bytes(b"")
    assert cli(tiny_base, files, out, "--resume") == 1
    assert "processes" in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_starts_afresh(tiny_base, files, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(tiny_base, files, out, callbacks=[InterruptAt(3)]) == 130
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):  # as if killed before its first save
        shutil.rmtree(checkpoint)
    (out / "checkpoints" / "checkpoint-2").mkdir()  # a save that was cut off is still refused
    assert cli(tiny_base, files, out, "--resume") == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    (out / "checkpoints" / "checkpoint-2").rmdir()
    assert cli(tiny_base, files, out, "--resume") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["train_steps"] == 28


class SlowThenKilled(TrainerCallback):
    """Steps that take `pause` seconds, then an error at `killed_at`: a run that ends without a checkpoint
    of its own (as a killed process does), after the one saved at step 8."""

    def __init__(self, pause: float, killed_at: int):
        self.pause, self.killed_at = pause, killed_at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.killed_at:
            raise RuntimeError("killed")
        time.sleep(self.pause)


def test_a_killed_run_resumes_with_the_training_time_its_checkpoint_took(tiny_base, files, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert cli(tiny_base, files, out, callbacks=[SlowThenKilled(0.25, killed_at=11)]) == 1
    assert "killed" in capsys.readouterr().err
    record = out / "checkpoints" / "checkpoint-8" / "elapsed.json"
    recorded = json.loads(record.read_text())["train_seconds"]
    assert recorded >= 8 * 0.25
    # a checkpoint without the record (an older version's) or with a cut-off one still resumes
    for name, damage in (("absent", lambda p: p.unlink()), ("cut", lambda p: p.write_text('{"train_sec'))):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        damage(copy / record.relative_to(out))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="training.pipeline"):
            assert cli(tiny_base, files, copy, "--resume") == 0
        assert "no readable record of its training time" in caplog.text
    started = time.perf_counter()
    assert cli(tiny_base, files, out, "--resume") == 0
    resumed_for = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 8
    # the time to reach step 8, plus the resumed session's: the killed steps 9-11 are not counted
    assert recorded < metrics["train_seconds"] < recorded + resumed_for


@pytest.mark.parametrize(("method", "stop_at"), [("lora", 11), ("adalora", 11), ("adalora", 20)])
def test_baselines_resume_after_ctrl_c_ends_with_the_same_adapter(tiny_base, files, finished, tmp_path, method,
                                                                  stop_at):
    # AdaLoRA on this 28-step run prunes ranks on steps 5-14 and keeps the final pattern after step 15:
    # a resume mid-pruning needs the importance averages, one after it the pattern and the pruned triplets.
    full, part = finished(method), tmp_path / "part"
    assert cli(tiny_base, files, part, "--method", method, callbacks=[InterruptAt(stop_at)]) == 130
    assert cli(tiny_base, files, part, "--method", method, "--resume") == 0
    assert json.loads((part / "metrics.json").read_text())["resumed_from_step"] == stop_at
    if method == "adalora":
        assert len(set(read_adapter(full).rank_pattern.values())) > 1  # ranks were pruned unevenly
    assert_same_adapter(full, part)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_baselines_write_peft_and_servable_adapters(tiny_base, other_tiny_base, files, finished, method):
    out = finished(method)
    assert (out / "peft" / "adapter_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["final_total_rank"] <= 24
    assert test_accuracy(tiny_base, out, files["test"]) == pytest.approx(metrics["test"]["accuracy"])
    # the base model is fingerprinted like an IncreLoRA adapter's: another base model is refused
    adapter = read_adapter(out)
    assert adapter.fingerprint == model_fingerprint(tiny_classifier(tiny_base, 2), adapter.modules_to_save)
    with pytest.raises(BaseModelMismatchError):
        load_adapter(tiny_classifier(other_tiny_base, 2), out)


def test_overwrite_keeps_the_old_adapter_when_the_new_run_cannot_start(files, finished, tmp_path):
    out = tmp_path / "kept"
    shutil.copytree(finished("increlora"), out)
    before = (out / "adapter_model.safetensors").read_bytes()
    assert cli(tmp_path / "no_such_model", files, out, "--overwrite") == 1
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_every_config_field_is_an_option_with_the_paper_default():
    parser = build_parser()
    text = parser.format_help()
    for name in IncreLoraConfig.field_help():
        assert "--" + name.replace("_", "-") in text
    args = parser.parse_args(["--task", "sst2", "--output", "x"])
    assert options_from(args).increlora == IncreLoraConfig()
    args = parser.parse_args(["--task", "sst2", "--output", "x", "--target-modules", "query,value",
                              "--no-advance-learning", "--target-total-rank", "30", "--rank-scaling", "fixed"])
    cfg = options_from(args).increlora
    assert cfg.target_modules == ["query", "value"] and not cfg.advance_learning
    assert cfg.target_total_rank == 30 and cfg.rank_scaling == "fixed"


def _bad_files(d: Path) -> dict[str, list[str]]:
    (d / "cols.csv").write_text("sentence,label\nhello,pos\n")
    (d / "label.csv").write_text("text,label\nhello,pos\nbye,maybe\n")
    (d / "empty.csv").write_text("text,label\n")
    (d / "broken.csv").write_text("text,label\nhello,pos\nhello,pos,extra\n")
    (d / "one_class.csv").write_text("text,label\nhello,pos\nbye,pos\n")
    (d / "used").mkdir()
    (d / "used" / "x").write_text("")
    return {
        "unknown task": ["--task", "nope", "--output", str(d / "o")],
        "file not found": ["--task", "t", "--train", str(d / "absent.csv"), "--output", str(d / "o")],
        "missing column": ["--task", "t", "--train", str(d / "cols.csv"), "--output", str(d / "o")],
        "outside the label set": ["--task", "t", "--train", "{train}", "--validation", str(d / "label.csv"),
                                  "--output", str(d / "o")],
        "no data rows": ["--task", "t", "--train", "{train}", "--validation", str(d / "empty.csv"),
                         "--output", str(d / "o")],
        "broken.csv:3": ["--task", "t", "--train", str(d / "broken.csv"), "--output", str(d / "o")],
        "already exists": ["--task", "t", "--train", "{train}", "--output", str(d / "used")],
        "no nn.Linear module matches": ["--task", "t", "--train", "{train}", "--output", str(d / "o"),
                                        "--target-modules", "nothing_here"],
        "init_rank must be": ["--task", "t", "--train", "{train}", "--output", str(d / "o"), "--init-rank", "0"],
        "single class": ["--task", "t", "--train", str(d / "one_class.csv"), "--output", str(d / "o")],
        "--max-length 100 is more than model": ["--task", "t", "--train", "{train}", "--output", str(d / "o"),
                                                 "--max-length", "100"],  # the tiny model has 64 positions
        "no checkpoint there to resume": ["--task", "t", "--train", "{train}", "--output", str(d / "used"),
                                          "--resume"],
        "--max-train-examples must be >= 1": ["--task", "t", "--train", "{train}", "--output", str(d / "o"),
                                              "--max-train-examples", "0"],
        "--head-lr-scale must be > 0": ["--task", "t", "--train", "{train}", "--output", str(d / "o"),
                                        "--head-lr-scale", "0"],
    }


def test_bad_input_gives_one_line_error_and_nonzero_exit(tiny_base, files, tmp_path, capsys):
    for expected, argv in _bad_files(tmp_path).items():
        argv = ["--model", str(tiny_base), *FAST] + [a.replace("{train}", str(files["train"])) for a in argv]
        assert main(argv) == 1, expected
        err = capsys.readouterr().err.strip()
        assert err.startswith("increlora-train: error: ") and "\n" not in err, (expected, err)
        assert expected in err, (expected, err)
        if expected == "unknown task":
            assert "rotten_tomatoes" in err and "sms_spam" in err


def test_console_script_error_has_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "increlora-train"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]
    proc = subprocess.run(cmd + ["--task", "nope", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("increlora-train: error: unknown task 'nope'")


def test_tasks_flag_trains_one_adapter_per_real_task(tiny_base, tmp_path):
    out = tmp_path / "adapters"
    argv = ["--tasks", "sms_spam,bbc_news", "--output", str(out), "--model", str(tiny_base), "--steps", "3",
            "--batch-size", "8", "--max-length", "16", "--init-warmup", "1", "--interval", "1", "--top-h", "4",
            "--save-steps", "10", "--no-progress"]
    assert main(argv) == 0
    for task, labels in (("sms_spam", 2), ("bbc_news", 5)):
        adapter = read_adapter(out / task)
        assert adapter.task == task and adapter.num_labels == labels
        assert "test" in json.loads((out / task / "metrics.json").read_text())
    assert main(argv + ["--resume"]) == 0  # finished tasks are skipped, not retrained


@pytest.mark.slow
def test_real_minilm_on_real_data_smoke(tmp_path):
    out = tmp_path / "sms"
    argv = ["--task", "sms_spam", "--output", str(out), "--steps", "3", "--batch-size", "8", "--max-length", "32",
            "--init-warmup", "0", "--interval", "1", "--top-h", "8", "--save-steps", "10", "--no-progress"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = read_adapter(out)
    assert adapter.base_model == "default" and metrics["num_modules"] == 36
    assert metrics["final_total_rank"] == 36 + 2 * 8  # growth at steps 1 and 2 (s > init_warmup 0)
    assert 0.0 <= metrics["test"]["f1"] <= 1.0


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(tmp_path):
    from training.pipeline import last_complete_checkpoint

    for step, files in ((4, ["trainer_state.json", "increlora_state.json"]), (8, ["model.safetensors"]),
                        (12, ["model.safetensors", "trainer_state.json"])):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    assert last_complete_checkpoint(tmp_path, "increlora") == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(tmp_path, "lora") == str(tmp_path / "checkpoint-12")
    assert last_complete_checkpoint(tmp_path / "checkpoint-8", "lora") is None


@pytest.mark.parametrize("config, tokenizer_limit, want", [
    ({"max_position_embeddings": 512}, 512, 512),
    ({"max_position_embeddings": 514}, 512, 512),  # RoBERTa: the tokenizer's limit is the lower one
    ({"max_position_embeddings": 64}, int(1e30), 64),  # a tokenizer without a limit
    ({"max_position_embeddings": 512, "position_biased_input": False}, int(1e30), None),  # DeBERTa-v3: relative
    ({"max_position_embeddings": 512, "position_biased_input": False}, 1024, 1024),
    ({"max_position_embeddings": 512, "position_embedding_type": "rotary"}, int(1e30), None),
])
def test_position_limit_counts_absolute_positions_only(config, tokenizer_limit, want):
    from types import SimpleNamespace

    from training.pipeline import position_limit
    model = SimpleNamespace(config=SimpleNamespace(**config))
    assert position_limit(SimpleNamespace(model_max_length=tokenizer_limit), model) == want


DERIVED = [a for i, a in enumerate(FAST) if a not in ("--init-warmup", "--interval", "--warmup-steps")
           and FAST[i - 1] not in ("--init-warmup", "--interval", "--warmup-steps")]


def test_the_cli_derives_and_prints_the_schedule(tiny_base, files, tmp_path, caplog):
    argv = ["--task", "toy", "--train", str(files["train"]), "--validation", str(files["validation"]),
            "--test", str(files["test"]), "--model", str(tiny_base), "--output", str(tmp_path / "a"), *DERIVED,
            "--max-train-examples", "100"]
    with caplog.at_level("INFO", logger="training.callback"):
        assert main(argv) == 0
    assert "IncreLoRA schedule over 28 steps: total rank 12 -> 24" in caplog.text
    assert "derived from the run: init_warmup, interval, top_h, warmup_steps" in caplog.text
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    growth = metrics["growth"]
    assert metrics["final_total_rank"] == 24 and growth["ended_at_step"] <= 0.4 * 28
    assert growth["plan"]["derived"] == ["init_warmup", "interval", "top_h", "warmup_steps"]
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log[-1]["epoch"] == pytest.approx(4.0)  # 100 examples, batch 16: 7 steps an epoch, 28 steps
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["increlora_config"]
    assert saved["interval"] == growth["plan"]["interval"] and saved["config_version"] == CONFIG_VERSION


def test_max_train_examples_keeps_every_class_of_a_split_stored_by_class():
    from training.data import Example, TaskData, TaskDefinition
    from training.pipeline import limit_training_examples

    def data():
        rows = [Example(f"t{i}", None, i // 100) for i in range(500)]  # 5 classes, 100 each, in class order
        definition = TaskDefinition(name="toy", text_fields=("text",), label_names=("a", "b", "c", "d", "e"))
        return TaskData(definition, {"train": rows})
    first, second = data(), data()
    limit_training_examples(first, 200)
    limit_training_examples(second, 200)
    assert len(first.splits["train"]) == 200 and first.splits["train"] == second.splits["train"]  # fixed
    assert {e.label for e in first.splits["train"]} == {0, 1, 2, 3, 4}
    texts = [e.text for e in first.splits["train"]]
    assert texts == sorted(texts, key=lambda t: int(t[1:]))  # the split's own order is kept
