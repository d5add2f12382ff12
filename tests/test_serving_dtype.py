"""dtype='auto': each branch of the native-bfloat16 detection, forced, and what the bank then runs in."""
from __future__ import annotations

import inspect
import logging

import pytest
import torch

from serving import AdapterBank, BankLoadError
from serving.bank.dtype import cpu_bf16_flags, native_bf16, resolve_dtype
from tests.helpers.adapters import adapter_set

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16, amx, want", [
    (True, False, {"avx512_bf16"}), (False, True, {"amx_bf16"}), (True, True, {"avx512_bf16", "amx_bf16"})])
def test_torch_probes_find_native_bfloat16(cpu_probes, avx512_bf16, amx, want):
    cpu_probes(avx512_bf16=avx512_bf16, amx=amx)
    assert cpu_bf16_flags() == want
    native, why = native_bf16(CPU)
    assert native and all(flag in why for flag in want)


def test_without_the_probes_the_kernel_flags_decide(cpu_probes):
    cpu_probes(cpuinfo="flags : fpu avx512f avx512_bf16 avx512_vnni")
    assert cpu_bf16_flags() == {"avx512_bf16"}
    cpu_probes(cpuinfo="flags : fpu avx512f avx512_vnni amx_tile amx_bf16")
    assert cpu_bf16_flags() == {"amx_bf16"}


@pytest.mark.parametrize("cpuinfo", ["flags : fpu sse avx2 avx512f avx512_vnni", None], ids=["no-flag", "no-file"])
def test_a_cpu_without_native_bfloat16_stays_in_float32(cpu_probes, caplog, cpuinfo):
    cpu_probes(cpuinfo=cpuinfo)
    assert cpu_bf16_flags() == set()
    with caplog.at_level(logging.INFO, logger="serving.bank.dtype"):
        assert resolve_dtype("auto", CPU) == torch.float32
    assert "dtype auto: float32 on cpu (the CPU has none of avx512_bf16, amx_bf16)" in caplog.text


def test_auto_picks_bfloat16_and_says_why(cpu_probes, caplog):
    cpu_probes(amx=True)
    with caplog.at_level(logging.INFO, logger="serving.bank.dtype"):
        assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert [r.getMessage() for r in caplog.records] == ["dtype auto: bfloat16 on cpu (the CPU has amx_bf16)"]


@pytest.mark.parametrize("supported", [True, False])
def test_cuda_devices_follow_torch(monkeypatch, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    assert resolve_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if supported else torch.float32)
    assert native_bf16(torch.device("cuda"))[1] == f"GPU X {'supports' if supported else 'lacks'} bfloat16"


def test_other_devices_stay_in_float32():
    assert resolve_dtype("auto", torch.device("meta")) == torch.float32


def test_an_explicit_dtype_always_wins(cpu_probes):
    cpu_probes(amx=True)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype(torch.float16, CPU) == torch.float16
    assert resolve_dtype(None, CPU) is None
    cpu_probes()
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


@pytest.mark.parametrize("bad", ["int8", "float64x", "Auto"])
def test_a_bad_dtype_is_refused(bad):
    with pytest.raises(BankLoadError, match="not 'auto' or a torch floating-point type"):
        resolve_dtype(bad, CPU)


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_bank_runs_in_what_auto_picks(cpu_probes, tiny_base, tmp_path, native, want):
    cpu_probes(amx=native)
    bank = AdapterBank.load(adapter_set(tiny_base, tmp_path), dtype="auto", device="cpu")
    assert bank.dtype == want and bank.describe()["dtype"] == str(want).removeprefix("torch.")
    assert not bank.load_errors
    assert len(bank.predict(["good film"], tasks=bank.tasks[0])) == 1


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_the_default_and_an_explicit_dtype_wins(cpu_probes, tiny_base, tmp_path, caplog, native, want):
    cpu_probes(amx=native)
    adapters = adapter_set(tiny_base, tmp_path)
    with caplog.at_level(logging.INFO, logger="serving.bank.dtype"):
        assert AdapterBank.load(adapters, device="cpu").dtype == want
    assert [r.getMessage() for r in caplog.records] == [
        f"dtype auto: {str(want).removeprefix('torch.')} on cpu "
        f"({'the CPU has amx_bf16' if native else 'the CPU has none of avx512_bf16, amx_bf16'})"]
    assert AdapterBank.load(adapters, device="cpu", dtype="float32").dtype == torch.float32
    assert AdapterBank.load(adapters, device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    assert AdapterBank.load(adapters, device="cpu", dtype=None).dtype == torch.float32  # the checkpoint's
    bank = AdapterBank.load(adapters, device="cpu", max_resident=2)  # the residency loader passes it on
    assert bank.dtype == want


def test_auto_is_the_default_of_every_other_loader():
    from serving.http.cli import build_parser

    assert build_parser().parse_args(["--adapters", "x"]).dtype == "auto"
    assert build_parser().parse_args(["--adapters", "x", "--dtype", "float32"]).dtype == "float32"
    ray_serve = pytest.importorskip("serving.http.ray_serve")
    assert inspect.signature(ray_serve.build_application).parameters["dtype"].default == "auto"


def test_increlora_serve_takes_auto():
    from serving.http.cli import build_parser

    assert build_parser().parse_args(["--adapters", "x", "--dtype", "auto"]).dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--adapters", "x", "--dtype", "int8"])
