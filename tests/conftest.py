import logging
import os

import pytest

# Under `make test` each pytest-xdist worker, and every process it starts, keeps to its share of the
# cores: OpenMP threads of two processes spinning on the same cores slow both several times over.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:  # torch reads it once, on import
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before they are
# imported (benchmarks/gpu_check.sh runs the same tests compiled on a GPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.http_adapters import make_http_base
from tests.tiny import make_tiny_base

# Tests marked slow here, beside the ones marked in their modules (`make test-fast` leaves them out):
# they start processes (servers, model processes, torchrun, the CLI) or train end to end.
SLOW = (
    "tests/test_distributed.py::test_two_replicas_train_like_one_process_with_the_whole_batch",
    "tests/test_distributed.py::test_a_loss_computed_from_the_logits_is_synced_too",
    "tests/test_distributed.py::test_gradients_missing_on_some_replicas",
    "tests/test_distributed.py::test_without_gradient_sync_the_replicas_drift_apart",
    "tests/test_distributed.py::test_processes_training_models_of_their_own_do_not_sync_with_replicas_false",
    "tests/test_distributed.py::test_increlora_train_under_torchrun_keeps_replicas_identical_and_resumes",
    "tests/test_distributed.py::test_torchrun_with_gradient_accumulation_syncs_once_per_step_and_stays_identical",
    "tests/test_http_server.py",
    "tests/test_ray_training.py::test_tasks_on_ray_equal_single_process_runs_and_failures_are_named",
    "tests/test_ray_training.py::test_every_kind_trains_on_ray_like_one_process",
    "tests/test_ray_serving.py",
    "tests/test_http_resilience.py",
    "tests/test_http_guarded_server.py",
    "tests/test_http_worker.py",
    "tests/test_demo.py",
    "tests/test_readme.py::test_the_readme_runs_top_to_bottom",
    "tests/test_cli.py::test_train_outputs_and_resume_after_ctrl_c",
    "tests/test_cli.py::test_baselines_write_peft_and_servable_adapters",
    "tests/test_cli.py::test_baselines_resume_after_ctrl_c_ends_with_the_same_adapter",
    "tests/test_cli.py::test_overwrite_keeps_the_old_adapter_when_the_new_run_cannot_start",
    "tests/test_cli.py::test_console_script_error_has_no_traceback",
    "tests/test_cli.py::test_tasks_flag_trains_one_adapter_per_real_task",
    "tests/test_trainer_callback.py::test_resume_after_the_budget_is_spent_ends_with_the_same_adapter",
    "tests/test_trainer_callback.py::test_plain_trainer_with_callback_matches_the_loop",
    "tests/test_trainer_callback.py::test_increlora_trainer_with_accumulation_matches_the_loop",
    "tests/test_trainer_callback.py::test_load_best_model_at_end_keeps_the_final_model_without_the_best_ones_state",
    "tests/test_trainer_callback.py::test_load_best_model_at_end_restores_the_best_checkpoints_ranks",
    "tests/test_train_kinds.py::test_every_kind_resumes_after_ctrl_c_to_the_same_adapter",
)


# `make test` spreads the modules over pytest-xdist workers (--dist loadfile). A module is one unit, so
# its module fixtures are built once; the Ray modules share a unit, so one worker starts one cluster.
# Units start longest first, then the rest as collected: the last unit to start should be a short one.
LONGEST_FIRST = (  # seconds per unit with two workers on 2 cores (sums of test durations, 2026-12-05)
    "tests/test_ray_serving.py",       # 120 with test_ray_training
    "tests/test_ray_training.py",
    "tests/test_distributed.py",       # 70
    "tests/test_http_resilience.py",   # 80
    "tests/test_readme.py",            # 100
    "tests/test_cli.py",               # 45
    "tests/test_benchmarks.py",        # 130: about 180 CPU seconds in two processes at a time
    "tests/test_train_kinds.py",       # 30
    "tests/test_http_server.py",       # 35
    "tests/test_http_residency.py",    # 17 (a real server)
    "tests/test_triton_kernels.py",    # 16
    "tests/test_trainer_callback.py",  # 34
    "tests/test_serving_kinds.py",     # 13
)
SHARED_UNITS = {"tests/test_ray_training.py": "tests/test_ray_serving.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("[")[0]
        if any(name == slow or name.startswith(slow + "::") for slow in SLOW):
            item.add_marker(pytest.mark.slow)
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleUnits(LoadFileScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return SHARED_UNITS.get(module, module)

    return ModuleUnits(config, log)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Folder of a tiny pretrained-like BERT (hidden 32, 2 layers) with its tokenizer."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_base(tmp_path_factory):
    """Same architecture, other weights: for base-model mismatch tests."""
    return make_tiny_base(tmp_path_factory.mktemp("other_tiny_base"), seed=1)


@pytest.fixture(scope="session")
def http_base(tmp_path_factory):
    """Folder of the tiny base model with a tokenizer that knows its words (see make_http_base)."""
    return make_http_base(tmp_path_factory.mktemp("http_base"))


@pytest.fixture
def two_threads():
    """Two intra-op threads in this test, whatever the worker runs with: for tests that check code which
    drops to one thread gives the count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_probes(monkeypatch, tmp_path):
    """Set what torch's probes and /proc/cpuinfo say of native bfloat16 (increlora.bf16):
    cpu_probes(avx512_bf16=..., amx=..., cpuinfo=...); the default is a CPU without it."""
    import increlora.bf16

    def force(avx512_bf16: bool = False, amx: bool = False, cpuinfo: str | None = "flags : fpu sse avx2 avx512f"):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        path = tmp_path / "cpuinfo"
        if cpuinfo is not None:
            path.write_text(cpuinfo)
        monkeypatch.setattr(increlora.bf16, "CPUINFO", path)
    return force


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the Ray tests: 2 CPUs, no dashboard, no auth, no usage reports."""
    import ray  # in the dev extra: make test installs it

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
