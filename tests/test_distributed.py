"""Data-parallel IncreLoRA: two gloo replicas with half a batch each train like one process with all of it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from increlora import IncreLoraConfig, apply_increlora, increlora_layers, orth_loss, read_adapter
from increlora.allocator import RankAllocator
from increlora.distributed import GradientSync, adapter_tensor_names, check_ddp_exclusion, exclude_from_ddp
from increlora.errors import ConfigError
from increlora.schedule import RestartWarmupScheduler
from tests.loop import synthetic_batches
from tests.tiny import tiny_classifier

STEPS, MICRO, BATCH, LR = 24, 2, 8, 5e-3


def config() -> IncreLoraConfig:
    # 12 modules, budget 24: growth at steps 3, 5, ..., drops the reserves before the end.
    return IncreLoraConfig(init_warmup=3, interval=2, top_h=3, warmup_steps=2, lora_dropout=0.0, orth_reg_weight=0.1)


def train(base, rank: int = 0, world: int = 1, sync_gradients: bool = True, replicas: bool | None = None,
          data_seed: int = 123, loss_from_logits: bool = False):
    """The plain loop; with world > 1 each replica takes its share of every micro-batch under DDP."""
    cfg = config()
    model = tiny_classifier(base, 2, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    apply_increlora(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    sched = RestartWarmupScheduler(opt, cfg.warmup_steps, STEPS)
    alloc = RankAllocator(model, cfg, STEPS, replicas=replicas)
    forward = DistributedDataParallel(model) if world > 1 else model
    sync = GradientSync(model) if world > 1 and sync_gradients else None
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    batches = synthetic_batches(STEPS, MICRO, batch=BATCH, seed=data_seed)
    model.train()
    for step in range(STEPS):
        for m in range(MICRO):
            ids, labels = batches[step * MICRO + m]
            quiet = forward.no_sync() if world > 1 and m < MICRO - 1 else nullcontext()
            with quiet:
                if loss_from_logits:  # the model's loss ignored, computed from the logits as custom code may do
                    loss = F.cross_entropy(forward(input_ids=ids[rows], labels=labels[rows]).logits, labels[rows])
                else:
                    loss = forward(input_ids=ids[rows], labels=labels[rows]).loss
                loss = loss + cfg.orth_reg_weight * orth_loss(model)
                (loss / MICRO).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        torch.manual_seed(1000 + rank * 7 + step)  # replicas draw different fresh components: rank 0's must win
        alloc.step(step, opt, sched)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if sync is not None:
        sync.remove()
    return model, alloc


def snapshot(model, alloc) -> tuple[dict, dict]:
    tensors = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return tensors, {"ranks": alloc.rank_pattern(), "history": [(e.step, e.module, e.added) for e in alloc.history]}


def _replica(rank: int, world: int, base: str, init_file: str, out: str, modes: tuple[str, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    try:
        for mode in modes:
            folder = Path(out, mode)
            folder.mkdir(exist_ok=True)
            if mode == "independent":  # one process group, but each process trains its own model on its own data
                torch.manual_seed(1000)
                result = train(base, replicas=False, data_seed=123 + rank)
            elif mode == "missing-grads":
                _check_missing_gradients(base, rank)
                (folder / f"rank{rank}.passed").touch()
                continue
            else:
                result = train(base, rank, world, sync_gradients=mode != "ddp-nosync",
                               loss_from_logits=mode == "logits")
            tensors, meta = snapshot(*result)
            save_file(tensors, folder / f"rank{rank}.safetensors")
            (folder / f"rank{rank}.json").write_text(json.dumps(meta))
    finally:
        dist.destroy_process_group()


def _check_missing_gradients(base, rank: int) -> None:
    """A parameter with no gradient anywhere keeps none; one missing on one replica averages with zero."""
    model = apply_increlora(tiny_classifier(base, 2, seed=0), config())
    sync = GradientSync(model)
    ids, labels = synthetic_batches(1, batch=4)[0]
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()  # the sync runs at its end
    params = [p for _, layer in increlora_layers(model) for p in layer.lora_A]
    nowhere, one_side = params[0], params[1]
    nowhere.grad = None
    one_side.grad = torch.ones_like(one_side) if rank == 0 else None
    sync.sync()
    assert nowhere.grad is None
    assert torch.equal(one_side.grad, torch.full_like(one_side, 0.5))
    assert sync.syncs == 2


MODES = ("ddp", "logits", "missing-grads", "ddp-nosync", "independent")


@pytest.fixture(scope="module")
def replica_runs(tmp_path_factory, request) -> Path:
    """Two replicas run every mode, one after another, in one pair of processes: starting them is the slow
    part. A mode that fails stops the pair, and the tests below report its traceback."""
    out = tmp_path_factory.mktemp("replicas")
    mp.spawn(_replica, args=(2, str(request.getfixturevalue("tiny_base")), str(out / "init"), str(out), MODES),
             nprocs=2, join=True)
    return out


def replicas(out: Path, mode: str, world: int = 2) -> list[tuple[dict, dict]]:
    return [(load_file(out / mode / f"rank{r}.safetensors"), json.loads((out / mode / f"rank{r}.json").read_text()))
            for r in range(world)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, request):
    base = request.getfixturevalue("tiny_base")
    torch.manual_seed(1000)
    model, alloc = train(base)
    return snapshot(model, alloc)


def test_two_replicas_train_like_one_process_with_the_whole_batch(replica_runs, single):
    (t0, m0), (t1, m1) = replicas(replica_runs, "ddp")
    ref_tensors, ref_meta = single
    assert m0 == m1, "replicas grew differently"
    assert t0.keys() == t1.keys()
    for name in t0:
        assert torch.equal(t0[name], t1[name]), f"{name} differs between replicas"
    # Same growth decisions and the same values as the single process (to float rounding).
    assert m0["history"] == [list(h) for h in ref_meta["history"]]
    assert m0["ranks"] == ref_meta["ranks"]
    assert sum(m0["ranks"].values()) == config().rank_budget(len(m0["ranks"]))
    assert t0.keys() == ref_tensors.keys()
    for name, ref in ref_tensors.items():
        torch.testing.assert_close(t0[name], ref, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_a_loss_computed_from_the_logits_is_synced_too(replica_runs, single):
    (t0, m0), (t1, m1) = replicas(replica_runs, "logits")
    assert m0 == m1 and all(torch.equal(t0[n], t1[n]) for n in t0)
    assert m0["history"] == [list(h) for h in single[1]["history"]]


def test_gradients_missing_on_some_replicas(replica_runs):
    # the checks run inside each process: a failed one stops the pair before it marks its pass
    assert all((replica_runs / "missing-grads" / f"rank{r}.passed").is_file() for r in range(2))


def test_without_gradient_sync_the_replicas_drift_apart(replica_runs):
    # The check above would pass vacuously if DDP already reduced the adapter: show it does not.
    (t0, _), (t1, _) = replicas(replica_runs, "ddp-nosync")
    lora = [n for n in t0 if ".lora_A." in n]
    assert lora and any(not torch.equal(t0[n], t1[n]) for n in lora)


def test_processes_training_models_of_their_own_do_not_sync_with_replicas_false(replica_runs, single):
    (t0, m0), (t1, _) = replicas(replica_runs, "independent")
    ref_tensors, ref_meta = single  # rank 0 trained on the single run's data, alone
    assert m0["history"] == [list(h) for h in ref_meta["history"]]
    for name, ref in ref_tensors.items():
        torch.testing.assert_close(t0[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(t0[n], t1[n]) for n in t0)  # rank 1 had other data


def test_apply_increlora_excludes_every_adapter_tensor_from_ddp(tiny_base):
    model = apply_increlora(tiny_classifier(tiny_base, 2), config())
    names = set(model._ddp_params_and_buffers_to_ignore)
    params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    adapter = {n for n in params if ".lora_" in n or ".reserve_" in n}
    assert adapter and adapter == names & params
    assert not any(n.endswith("base_layer.weight") for n in names)
    check_ddp_exclusion(model)


def test_a_structure_grown_after_exclusion_is_caught(tiny_base):
    model = apply_increlora(tiny_classifier(tiny_base, 2), config())
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "grow"))
    layer.add_block(2)
    with pytest.raises(ConfigError, match="exclude_from_ddp"):
        check_ddp_exclusion(model)
    exclude_from_ddp(model)
    check_ddp_exclusion(model)
    assert f"{name}.lora_A.1" in adapter_tensor_names(model)


# -- increlora-train under torchrun ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(argv: list[str], report: Path, interrupt_at: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.ddp_cli_run", str(report), *argv]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "INTERRUPT_AT": str(interrupt_at)}
    return subprocess.run(cmd, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300)


def cli_argv(tiny_base, folder: Path, *extra: str) -> list[str]:
    """increlora-train on the CLI tests' generated CSV files and fast schedule, into folder/adapter."""
    from tests.helpers.train_cli import FAST, write_csv

    sizes = [("train", 320), ("dev", 48), ("test", 48)]
    csv = {s: write_csv(folder / f"{s}.csv", n, i) for i, (s, n) in enumerate(sizes)}
    return ["--task", "toy", "--train", str(csv["train"]), "--validation", str(csv["dev"]), "--test", str(csv["test"]),
            "--model", str(tiny_base), "--output", str(folder / "adapter"), *FAST, *extra]


def test_increlora_train_under_torchrun_keeps_replicas_identical_and_resumes(tiny_base, tmp_path):
    from tests.helpers.train_cli import FAST

    out, report = tmp_path / "adapter", tmp_path / "report.json"
    argv = cli_argv(tiny_base, tmp_path, "--batch-size", "8")
    steps = int(FAST[FAST.index("--steps") + 1])

    # Only one replica gets the Ctrl-C: both must stop after the same step and leave its checkpoint.
    stopped = torchrun_cli(argv, report, interrupt_at=10)
    assert stopped.returncode != 0 and "interrupted at step 10" in stopped.stderr, stopped.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-10").is_dir()
    first = json.loads(report.read_text())
    assert [s["step"] for s in first["steps"]] == list(range(1, 11))

    resumed = torchrun_cli([*argv, "--resume"], report)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("toy: test accuracy") == 1, resumed.stdout  # one process reports and writes
    run = json.loads(report.read_text())
    assert run["world_size"] == 2
    assert run["epoch"] == pytest.approx(steps * 2 * 8 / 320)  # each step consumed 2 x 8 rows
    allsteps = first["steps"] + run["steps"]
    assert [s["step"] for s in allsteps] == list(range(1, steps + 1))
    assert all(s["agree"] for s in allsteps), [s for s in allsteps if not s["agree"]][:3]
    ranks = [s["total_rank"] for s in allsteps]
    assert ranks[0] < ranks[-1] == 24  # it grew, to the budget (12 modules x avg rank 2)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_total_rank"] == 24 and metrics["resumed_from_step"] == 10
    assert sum(read_adapter(out).rank_pattern.values()) == 24
    assert not (out / "checkpoints").exists()


def test_torchrun_with_gradient_accumulation_syncs_once_per_step_and_stays_identical(tiny_base, tmp_path):
    report = tmp_path / "report.json"
    argv = cli_argv(tiny_base, tmp_path, "--batch-size", "4", "--grad-accum", "2", "--steps", "12")
    done = torchrun_cli(argv, report)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(report.read_text())
    assert run["epoch"] == pytest.approx(12 * 2 * 2 * 4 / 320)  # 2 processes x 2 micro-batches x 4 rows
    assert [s["step"] for s in run["steps"]] == list(range(1, 13))
    assert all(s["agree"] for s in run["steps"]), [s for s in run["steps"] if not s["agree"]][:3]
    assert run["syncs"] == 12  # once per optimizer step, not once per micro-batch
