"""ggml's ``test-backend-ops`` (a GPU backend against the CPU backend) for the ops and types the llada2 graph uses.

``python -m ggml_patch.op_check --backend vulkan|cuda [--quick] [--only REGEX]`` (``make op-check``): builds
``test-backend-ops`` in the installed runtime's own build tree (``$DLLM_HOME/build/<backend>-<key>/build``,
reconfigured with tests on; the library objects are reused), runs one case list per op below and prints a table
of cases OK / FAIL / not supported and seconds per op. Exit 1 if a case FAILs or an op cannot run.

The list comes from the graph (``ggml_patch/README.md``, "Op coverage"): the element-wise ops, norms, RoPE,
softmax, the MoE router's ARGSORT / TOP_K / GET_ROWS / SET_ROWS, the confidence head's vocabulary-sized TOP_K,
and MUL_MAT / MUL_MAT_ID on the weight types of our files (f32, q8_0, q4_K, q6_K). ``--quick`` leaves out the
cases whose pipelines take minutes to compile on a software device (f16 MUL_MAT, flash attention, ROPE).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ggml_patch import build as B

WEIGHTS = r"type_a=(f32|q8_0|q4_K|q6_K),type_b=f32"


@dataclass(frozen=True)
class OpCase:
    label: str
    op: str              # -o
    params: str = ""     # -p regex ("" = every case)
    slow: bool = False   # left out by --quick


OPS = (
    OpCase("ADD", "ADD", "type=f32"), OpCase("MUL", "MUL", "type=f32"), OpCase("DIV", "DIV", "type=f32"),
    OpCase("SCALE", "SCALE", "type=f32"), OpCase("SUM_ROWS", "SUM_ROWS"), OpCase("CLAMP", "CLAMP"),
    OpCase("SIGMOID", "SIGMOID", "type=f32"), OpCase("SILU", "SILU", "type=f32"),
    OpCase("SWIGLU", "SWIGLU", "type=f32"), OpCase("FILL", "FILL"), OpCase("CONT", "CONT", "type=f32"),
    OpCase("ARGMAX", "ARGMAX"), OpCase("RMS_NORM", "RMS_NORM"), OpCase("ADD_ID", "ADD_ID"),
    OpCase("SOFT_MAX", "SOFT_MAX", "type=f32"), OpCase("ARGSORT", "ARGSORT"),
    OpCase("GET_ROWS", "GET_ROWS", r"type=(f32|q8_0|q4_K|q6_K),n=[0-9]{1,3},"),
    OpCase("SET_ROWS", "SET_ROWS", r"type_src=f32,type_dst=(f32|f16|q8_0)"),
    OpCase("CPY f32->f32/f16", "CPY", r"type_src=f32,type_dst=(f32|f16)"),
    OpCase("TOP_K vocabulary rows", "TOP_K", r"ne=\[(151936|202048),"),
    OpCase("MUL_MAT", "MUL_MAT", WEIGHTS), OpCase("MUL_MAT_ID", "MUL_MAT_ID", WEIGHTS),
    OpCase("ROPE", "ROPE", "type=f32", slow=True),
    OpCase("MUL_MAT f16", "MUL_MAT", "type_a=f16,type_b=f32", slow=True),
    OpCase("FLASH_ATTN_EXT hs=128", "FLASH_ATTN_EXT", r"hsk=128,hsv=128,.*type_K=(f32|f16|q8_0)", slow=True),
)
DEVICE = {"vulkan": "Vulkan0", "cuda": "CUDA0", "metal": "MTL0"}


def tool(backend: str, status=print) -> Path:
    """Build (once) and return ``test-backend-ops`` in the installed ``backend`` runtime's build tree."""
    res = B.build(backend, status=status)
    bdir = B.home() / "build" / f"{backend}-{res.key}" / "build"
    exe = bdir / "bin" / "test-backend-ops"
    if exe.is_file():
        return exe
    if not (bdir / "CMakeCache.txt").is_file():
        raise SystemExit(f"error: no build tree at {bdir} (the runtime was installed from elsewhere); "
                         f"rebuild it: dllm runtime build --backend {backend} --force")
    log = bdir.parent / "op-check-build.log"
    src = bdir.parent / "llama.cpp"
    for cmd in (["cmake", "-S", str(src), "-B", str(bdir), "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_COMMON=ON"],
                ["cmake", "--build", str(bdir), "--target", "test-backend-ops", "-j", str(os.cpu_count() or 2)]):
        status(f"$ {' '.join(cmd)}  (log: {log})")
        with open(log, "a") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"error: building test-backend-ops failed: see {log}")
    return exe


def count(text: str) -> tuple[int, int, int]:
    """(OK, FAIL, not supported) case lines of one ``test-backend-ops test`` run."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in text.splitlines() if ln.startswith("  ") and "(" in ln]
    return (sum(ln.rstrip().endswith(": OK") for ln in lines), sum(ln.rstrip().endswith("FAIL") for ln in lines),
            sum("not supported" in ln for ln in lines))


def run(exe: Path, device: str, case: OpCase, timeout: float) -> tuple[int, int, int, float, str]:
    """One op: (ok, fail, not supported, seconds, note)."""
    cmd = [str(exe), "test", "-b", device, "-o", case.op] + (["-p", case.params] if case.params else [])
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
        ok, fail, ns = count(res.stdout)
        note = "" if res.returncode == 0 else f"exit {res.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        ok, fail, ns = count(out)
        note = f"timeout after {timeout:.0f} s"
    return ok, fail, ns, time.monotonic() - t0, note


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ggml_patch.op_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="vulkan", choices=sorted(DEVICE))
    ap.add_argument("--quick", action="store_true", help="leave out the slow-to-compile cases")
    ap.add_argument("--only", default="", help="regex on the op labels")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per op")
    args = ap.parse_args(argv)
    if args.backend == "vulkan":
        from ggml_patch import lavapipe
        from ggml_patch.backends.vulkan import shader_cache_dir
        lavapipe.select(os.environ)  # Mesa 25's lavapipe: Debian 12's 22.3 corrupts its heap
        os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")  # lavapipe is a CPU-type device: name it
        os.environ.setdefault("MESA_SHADER_CACHE_DIR", str(shader_cache_dir()))
    exe = tool(args.backend, status=lambda m: print(m, file=sys.stderr))
    cases = [c for c in OPS if not (args.quick and c.slow) and re.search(args.only, c.label)]
    bad = 0
    print(f"{'op':26} {'OK':>5} {'FAIL':>5} {'n.s.':>5} {'s':>7}  note")
    for c in cases:
        ok, fail, ns, secs, note = run(exe, DEVICE[args.backend], c, args.timeout)
        bad += fail + (1 if note or ok == 0 else 0)
        print(f"{c.label:26} {ok:5} {fail:5} {ns:5} {secs:7.1f}  {note}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
