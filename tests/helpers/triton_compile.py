"""Compile every Triton kernel variant for GPU targets on a machine without a GPU (ptxas ships in the
triton wheel). Run as a module in a process without TRITON_INTERPRET; prints one JSON line per kernel.

    python -m tests.helpers.triton_compile 80 90
"""
from __future__ import annotations

import json
import os
import sys

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def variants():
    """(kernel name, dtype, precision): fp32 in both precisions, the half types once."""
    for kernel in ("shrink_kernel", "expand_kernel", "fused_kernel"):
        for dtype in DTYPES:
            for precision in (("ieee", "tf32") if dtype == "float32" else ("ieee",)):
                yield kernel, dtype, precision


def compile_one(kernel: str, dtype: str, precision: str, capability: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from serving.ops import triton_kernels as k
    from serving.ops import triton_segments as ts

    fn = getattr(k, kernel)
    blocks = {"BLOCK_M": ts.BLOCK_M, "BLOCK_N": ts.BLOCK_N, "BLOCK_R": ts.BLOCK_R, "BLOCK_K": ts.BLOCK_K}
    constexprs = {n: blocks[n] for n in fn.arg_names if n in blocks} | {"PRECISION": precision, "UPCAST": False}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("tiles_ptr", "meta_ptr"):
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + DTYPES[dtype]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32))
    return {"kernel": kernel, "dtype": dtype, "precision": precision, "sm": capability,
            "cubin_bytes": len(compiled.asm["cubin"]), "ptx_target": f"sm_{capability}" in compiled.asm["ptx"]}


def main(capabilities: list[int]) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels that are to be compiled")
    for capability in capabilities:
        for kernel, dtype, precision in variants():
            print(json.dumps(compile_one(kernel, dtype, precision, capability)), flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [80, 90])
