"""`make demo`'s serving half: the service started on adapters of every kind answers the mixed requests,
each example from its task's test split with the true answer beside the served one."""
from __future__ import annotations

import ast
import json
import re

from increlora import read_adapter
from tests.helpers.adapters import make_adapter
from training import demo
from training.tasks import get_definition


def test_demo_serves_every_kind_and_prints_answers_beside_the_truth(tiny_base, tmp_path, capsys):
    for i, task in enumerate(demo.TASKS.split(",")):  # random adapters: labels "<task>_<i>", never the truth
        make_adapter(tiny_base, tmp_path, task, num_labels=len(get_definition(task).label_names), seed=i,
                     base_model=str(tiny_base))
    make_adapter(tiny_base, tmp_path, demo.SEARCH_TASK, task_type="embedding", seed=7, base_model=str(tiny_base))
    make_adapter(tiny_base, tmp_path, demo.ENTITY_TASK, task_type="token-classification", num_labels=5, seed=8,
                 base_model=str(tiny_base))
    tags = read_adapter(tmp_path / demo.ENTITY_TASK).labels
    for i, task in enumerate(demo.ALL_TASKS):
        (tmp_path / task / "metrics.json").write_text(json.dumps({"test": {"main": 0.61 + i / 100}}))

    assert demo.serve_and_query(str(tmp_path)) == 0

    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if line.startswith("  [")]
    examples = demo.classification_examples()
    assert len(answers) == len(examples) == 6
    for (task, text, truth), line in zip(examples, answers):
        got = re.match(rf"  \[{task:15s}\] (\S+) +\((right|WRONG, true (\S+)),", line)
        assert got and got[1] in read_adapter(tmp_path / task).labels, line
        assert (got[2] == "right") == (got[1] == truth) and got[3] in (None, truth)
        assert line.endswith(demo._short(text))
    hits = re.findall(r"      -> .*  \((its own article|another article; its own ranks (\d+))\)", out)
    assert len(hits) == 3 and all(h[0] == "its own article" or int(h[1]) >= 2 for h in hits)
    served = [ast.literal_eval(s) for s in re.findall(r"      served (\[.*\])", out)]
    truths = [ast.literal_eval(s) for s in re.findall(r"      true   (\[.*\])", out)]
    assert truths == [t for _, t in demo.entity_examples()]
    for (text, _), entities in zip(demo.entity_examples(), served):
        assert all(e.split(": ", 1)[0] in {t[2:] for t in tags if t != "O"} and e.split(": ", 1)[1] in text
                   for e in entities)
    right = sum(e in t for s, t in zip(served, truths) for e in s)
    assert f"  served {right} of the {sum(map(len, truths))} true entities exactly, and " \
           f"{sum(map(len, served)) - right} others" in out
    for i, task in enumerate(demo.ALL_TASKS):
        assert f'{task:15s} test {{"main": {0.61 + i / 100}}}' in out
    assert out.rstrip().endswith("service stopped")
