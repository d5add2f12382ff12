"""`make demo`'s serving half: the service started on trained adapters answers the mixed requests."""
from __future__ import annotations

import json

from tests.helpers.adapters import make_adapter
from training import demo


def test_demo_serves_the_three_tasks_and_prints_answers_next_to_metrics(tiny_base, tmp_path, capsys):
    tasks = demo.TASKS.split(",")
    for i, task in enumerate(tasks):
        make_adapter(tiny_base, tmp_path, task, num_labels=2 + i, seed=i, base_model=str(tiny_base))
        (tmp_path / task / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.61 + i / 100}}))

    assert demo.serve_and_query(str(tmp_path)) == 0

    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(answers) == len(demo.EXAMPLES)
    for (task, text), line in zip(demo.EXAMPLES, answers):
        assert line.startswith(f"  [{task:15s}] {task}_") and line.endswith(text), line  # a label of that task
    for i, task in enumerate(tasks):
        assert f'{task:15s} test {{"accuracy": {0.61 + i / 100}}}' in out
        assert f"rank heatmap: {tmp_path / task / 'ranks_heatmap.png'}" in out
    assert out.rstrip().endswith("service stopped")
