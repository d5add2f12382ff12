"""Run under torchrun by tests/test_distributed.py: increlora-train with a callback checking the replicas.

    torchrun --nproc_per_node 2 -m tests.ddp_cli_run <report.json> <increlora-train arguments...>

After every optimizer step, each replica's adapter (structure and values) is hashed and the hashes
are gathered; rank 0 writes, per step, whether all replicas agreed, plus the global batch seen and
how many times the adapter gradients were averaged.
With INTERRUPT_AT=k in the environment, the last replica alone sends itself SIGINT after step k.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from increlora import increlora_layers
from training.cli import main


def adapter_digest(model) -> str:
    h = hashlib.sha256()
    for name, layer in increlora_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                h.update(f"{name}.{pname}{tuple(p.shape)}".encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class ReplicaCheck(TrainerCallback):
    def __init__(self, report: str):
        self.report, self.steps, self.syncs = report, [], -1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, adapter_digest(model))
        sync = next((hook.__self__ for hook in model._forward_hooks.values()
                     if type(getattr(hook, "__self__", None)).__name__ == "GradientSync"), None)
        self.syncs = sync.syncs if sync is not None else -1  # adapter gradient averages so far
        self.steps.append({"step": state.global_step, "agree": len(set(digests)) == 1,
                           "total_rank": sum(layer.active_rank for _, layer in increlora_layers(model))})
        last = dist.get_rank() == dist.get_world_size() - 1
        if last and state.global_step == int(os.environ.get("INTERRUPT_AT", "0")):
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_end(self, args, state, control, **kwargs):
        if dist.get_rank() == 0:
            with open(self.report, "w") as f:
                json.dump({"world_size": dist.get_world_size(), "epoch": state.epoch, "steps": self.steps,
                           "syncs": self.syncs}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[2:], callbacks=[ReplicaCheck(sys.argv[1])]))
