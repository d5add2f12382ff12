import dataclasses

import pytest
import torch

from increlora import CheckpointError, IncreLoraConfig, rank_pattern
from increlora.checkpoint import load_checkpoint
from tests.loop import build, train

CFG = IncreLoraConfig(target_avg_rank=3.0, top_h=2, add_rank=2, init_warmup=4, interval=3, warmup_steps=3)


@pytest.mark.parametrize("grow_init", ["paper", "lora"])  # "lora" moves joined reserves to a new group
@pytest.mark.parametrize("stop_at", [3, 9, 20])  # before growth, during growth, after the budget
def test_resume_ends_with_the_same_adapter(tiny_base, tmp_path, stop_at, grow_init):
    steps = 24
    cfg = dataclasses.replace(CFG, grow_init=grow_init)
    full, opt_full, *_ = train(tiny_base, cfg, steps, micro=2)
    ckpt = tmp_path / "ckpt"
    train(tiny_base, cfg, steps, micro=2, stop_at=stop_at, checkpoint_dir=ckpt)
    resumed, opt_res, *_ = train(tiny_base, cfg, steps, micro=2, resume_from=ckpt)
    assert rank_pattern(resumed) == rank_pattern(full)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    assert len(opt_res.param_groups) == len(opt_full.param_groups)


def test_checkpoint_errors(tiny_base, tmp_path):
    model, opt, sched, alloc = build(tiny_base, CFG, 10)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "missing", model=model, optimizer=opt, scheduler=sched, allocator=alloc)
    ckpt = tmp_path / "ckpt"
    train(tiny_base, CFG, 10, stop_at=2, checkpoint_dir=ckpt)
    (ckpt / "checkpoint.json").write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, allocator=alloc)
