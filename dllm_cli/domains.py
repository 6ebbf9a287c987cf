"""The domain of every numeric option, in one table: the CLI's option callbacks (run, chat, bench), chat's
``/set`` and ``DecodeConfig`` all check values here, so ``--seed -1``, ``/set seed -1`` and
``DecodeConfig(seed=-1)`` give the same one-line UsageError.

Floats must be finite (``nan``, ``inf`` are refused everywhere); integers must be whole numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from dllm_cli.errors import UsageError, clip

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Domain:
    """``kind`` values in ``lo..hi`` (``lo_open``/``hi_open`` exclude the bound); None means unbounded.

    ``or_zero`` also admits exactly 0 below ``lo`` (``--temperature``: 0 is greedy; between 0 and ``lo`` the
    logits would be scaled past float32, so a denormal is refused instead of turning into NaNs).
    """

    flag: str
    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    or_zero: bool = False

    def describe(self) -> str:
        if self.or_zero:
            upper = f" and <= {_num(self.hi)}" if self.hi is not None else ""
            return f"0 or a number >= {_num(self.lo or 0)}{upper}"
        if self.lo is not None and self.hi is not None:
            what = "an integer in " if self.kind is int else "in "
            return f"{what}{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        noun = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return noun

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is outside the domain (one line naming the option), or None."""
        must = f"{self.flag} must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, Integral if self.kind is int else Real):
            return f"{must}, got {clip(value)}"
        if self.kind is float and not math.isfinite(float(value)):
            return f"{must}, got {_got(value)}"
        v: Any = float(value) if self.kind is float else value  # an Integral compares exactly, however big
        if self.or_zero and v == 0:
            return None
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return f"{must}, got {_got(value)}"
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return f"{must}, got {_got(value)}"
        return None

    def check(self, value: Any) -> Any:
        """``value`` unchanged, or a UsageError saying why it is out of the domain."""
        problem = self.problem(value)
        if problem:
            raise UsageError(problem)
        return value

    def parse(self, text: str) -> Any:
        """``"0.6"`` -> 0.6, checked; unreadable text (``nan``, ``1e999``, ``abc``) is a UsageError."""
        raw = text.strip()
        try:
            value: Any = int(raw) if self.kind is int else float(raw)
        except ValueError:
            raise UsageError(f"{self.flag} takes {'an integer' if self.kind is int else 'a number'}, "
                             f"got {clip(raw)}") from None
        return self.check(value)


def _num(x: float) -> str:
    if x == 2**64 - 1:
        return "2^64-1"
    return str(int(x)) if float(x).is_integer() else str(x)


def _got(value: Any) -> str:
    return clip(value, 40, quote=False)


DOMAINS: dict[str, Domain] = {d.flag.lstrip("-").replace("-", "_"): d for d in (
    # decoding (DecodeConfig fields; also chat's /set)
    Domain("--threshold", float, 0.0, 1.0),
    Domain("--editing-threshold", float, 0.0, 1.0),
    Domain("--top-p", float, 0.0, 1.0, lo_open=True),
    # 0 is greedy; below 1e-6 a sampler is greedy in all but name (logits ~10 apart differ by 1e7 after 1/T), and
    # denormals would overflow 1/T: refused, with dllm serve's temperature field (serve/validate.py)
    Domain("--temperature", float, 1e-6, or_zero=True),
    Domain("--top-k", int, 0, INT32_MAX),
    Domain("--max-post-steps", int, 0, 4096),
    Domain("--max-tokens", int, 1, INT32_MAX),
    Domain("--block-length", int, 1, 65536),
    Domain("--steps", int, 1, INT32_MAX),
    Domain("--mbe", int, 0, 1024),
    Domain("--seed", int, 0, 2**64 - 1),  # numpy's generators take any non-negative integer; 64 bits is plenty
    # runtime
    Domain("--threads", int, 1, 512),  # GGML_MAX_N_THREADS
    Domain("--n-gpu-layers", int, 0, INT32_MAX),
    Domain("--ctx-size", int, 32, 1 << 20),  # llama.cpp's n_ctx is 32-bit; 16M tokens is beyond any LLaDA2
    # chat: --replay's speed factor; the live view's hold per step in ms (beyond 5 s a step it is no longer live:
    # slow motion is --replay with a small --speed)
    Domain("--speed", float, 1e-3, 1e6, or_zero=True),  # 0: no pauses; 1e-300 would make one gap last forever
    Domain("--view-pace", int, 0, 5000),
    # bench
    Domain("--reps", int, 1, 1_000_000),
    Domain("--warmup", int, 0, 1_000_000),
    Domain("--ar-tokens", int, 1, 1 << 20),
    Domain("--recompute-samples", int, 1, 1_000_000),
    Domain("--estimate-layers", int, 1, 4096),
    Domain("--layers", int, 1, 4096),
    Domain("--prefill", int, 1, 1 << 20),
    Domain("--prefix", int, 0, 1 << 20),
)}


def check(name: str, value: Any) -> Any:
    """``value`` if it is in the domain of option ``name`` (``"seed"``, ``"top_p"``), else a UsageError."""
    return DOMAINS[name].check(value)


def problem(name: str, value: Any) -> str | None:
    return DOMAINS[name].problem(value)


def parse(name: str, text: str) -> Any:
    return DOMAINS[name].parse(text)


def parse_list(name: str, text: str | None) -> tuple[Any, ...]:
    """``"2,4"`` -> ``(2, 4)``, every element checked against option ``name``'s domain; empty items skipped."""
    if text is None:
        return ()
    d = DOMAINS[name]
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"{d.flag} needs at least one value, got {clip(text)}", f"for example {d.flag} 2,4")
    return tuple(d.parse(x) for x in items)
