"""A plain IncreLoRA training loop on synthetic data, the reference the tests drive the core with."""
from __future__ import annotations

import torch

from increlora import IncreLoraConfig, apply_increlora, orth_loss
from increlora.allocator import RankAllocator
from increlora.checkpoint import load_checkpoint, save_checkpoint
from increlora.schedule import RestartWarmupScheduler
from tests.tiny import tiny_classifier


def synthetic_batches(steps: int, micro: int = 1, batch: int = 8, seq: int = 12, vocab: int = 100, seed: int = 123):
    """Deterministic token batches whose label depends on the tokens (so there is signal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps * micro):
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        labels = (ids[:, 1] > vocab // 2).long()
        out.append((ids, labels))
    return out


def build(base_dir, config: IncreLoraConfig, total_steps: int, lr: float = 5e-3, seed: int = 0,
          dropout: float | None = None):
    kw = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    model = tiny_classifier(base_dir, 2, seed=seed, **kw)
    torch.manual_seed(seed)
    apply_increlora(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    alloc = RankAllocator(model, config, total_steps)  # its plan fills in the schedule fields left unset
    sched = RestartWarmupScheduler(opt, alloc.plan.warmup_steps, total_steps)
    return model, opt, sched, alloc


def train(base_dir, config: IncreLoraConfig, total_steps: int, micro: int = 1, stop_at: int | None = None,
          checkpoint_dir=None, resume_from=None, seed: int = 0, lr: float = 5e-3):
    """Run the loop; optionally stop after `stop_at` steps writing a checkpoint, or resume from one."""
    model, opt, sched, alloc = build(base_dir, config, total_steps, lr=lr, seed=seed)
    batches = synthetic_batches(total_steps, micro)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model=model, optimizer=opt, scheduler=sched, allocator=alloc)["step"]
    model.train()
    lrs = []
    for step in range(start, total_steps):
        for m in range(micro):
            ids, labels = batches[step * micro + m]
            loss = model(input_ids=ids, labels=labels).loss
            loss = loss + config.orth_reg_weight * orth_loss(model)
            (loss / micro).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        alloc.step(step, opt, sched)
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if stop_at is not None and step + 1 == stop_at:
            save_checkpoint(checkpoint_dir, model=model, optimizer=opt, scheduler=sched, allocator=alloc, step=step + 1)
            return model, opt, sched, alloc, lrs
    return model, opt, sched, alloc, lrs
