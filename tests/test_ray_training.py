"""increlora-train --ray on a local Ray cluster: each task a Ray task, the same adapters as one process,
a failed task named without stopping the others, an interrupted task continued from its checkpoint and
finished tasks skipped on a rerun."""
from __future__ import annotations

import json

import pytest

from tests.helpers.train_cli import InterruptAt, assert_same_adapter
from training.cli import main

ARGS = ["--steps", "3", "--batch-size", "8", "--max-length", "16", "--init-warmup", "1", "--interval", "1",
        "--top-h", "4", "--save-steps", "10", "--no-progress", "--seed", "3", "--fp32"]  # compared across runs


def test_tasks_on_ray_equal_single_process_runs_and_failures_are_named(ray_cluster, tiny_base, tmp_path, capsys):
    alone = tmp_path / "alone"
    assert main(["--tasks", "sms_spam,bbc_news", "--output", str(alone), "--model", str(tiny_base), *ARGS]) == 0
    capsys.readouterr()
    fanned = tmp_path / "ray"
    # sms_spam was interrupted at step 2 (on this machine); --resume continues it on Ray
    assert main(["--task", "sms_spam", "--output", str(fanned / "sms_spam"), "--model", str(tiny_base), *ARGS],
                callbacks=[InterruptAt(2)]) == 130
    argv = ["--tasks", "sms_spam,nope,bbc_news", "--output", str(fanned), "--model", str(tiny_base), *ARGS,
            "--ray", "--cpus-per-task", "0.5", "--resume"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "1 of 3 tasks failed: nope:" in err and "sms_spam: done" in out and "bbc_news: done" in out
    assert json.loads((fanned / "sms_spam" / "metrics.json").read_text())["resumed_from_step"] == 2
    for task in ("sms_spam", "bbc_news"):
        assert_same_adapter(alone / task, fanned / task)
        assert (json.loads((alone / task / "metrics.json").read_text())["test"]
                == pytest.approx(json.loads((fanned / task / "metrics.json").read_text())["test"], abs=1e-4))
    # a rerun with --resume skips what finished and retries what failed (still failing here)
    argv[argv.index("sms_spam,nope,bbc_news")] = "sms_spam,bbc_news"
    assert main(argv) == 0
    assert "sms_spam: done (already finished)" in capsys.readouterr().out


def test_ray_options_are_checked(tiny_base, tmp_path, capsys):
    base = ["--tasks", "sms_spam", "--output", str(tmp_path / "x"), "--model", str(tiny_base), *ARGS]
    assert main(base + ["--cpus-per-task", "2"]) == 1
    assert "go with --ray" in capsys.readouterr().err
    assert main(base + ["--ray", "--cpus-per-task", "0"]) == 1
    assert "--cpus-per-task must be > 0" in capsys.readouterr().err


def test_every_kind_trains_on_ray_like_one_process(ray_cluster, tiny_base, tmp_path, capsys):
    tasks = "bbc_retrieval,wnut16"  # embedding, token classification (a reranker is a sequence classifier)
    args = [*ARGS, "--max-train-examples", "32", "--model", str(tiny_base)]
    assert main(["--tasks", tasks, "--output", str(tmp_path / "alone"), *args]) == 0
    assert main(["--tasks", tasks, "--output", str(tmp_path / "ray"), *args, "--ray", "--cpus-per-task", "0.5"]) == 0
    out = capsys.readouterr().out
    for task, kind, metric in (("bbc_retrieval", "embedding", "mrr@10"), ("wnut16", "token-classification", "f1")):
        assert f"{task}: done (test {metric}" in out
        assert_same_adapter(tmp_path / "alone" / task, tmp_path / "ray" / task)
        assert json.loads((tmp_path / "ray" / task / "adapter_config.json").read_text())["task_type"] == kind
        assert (json.loads((tmp_path / "alone" / task / "metrics.json").read_text())["test"]
                == pytest.approx(json.loads((tmp_path / "ray" / task / "metrics.json").read_text())["test"], abs=1e-4))
