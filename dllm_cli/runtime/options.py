"""Runtime options shared by ``run``, ``chat`` and ``bench``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllm_cli.errors import UsageError
from dllm_cli.runtime.threads import default_threads

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type values


@dataclass(frozen=True)
class RuntimeOptions:
    """How to load a model and size its context.

    ``n_gpu_layers`` None means "all layers on the GPU when the runtime has one, else 0".
    ``flash_attn`` None means llama.cpp's auto; a quantized KV cache needs it on.
    """

    threads: int | None = None
    n_gpu_layers: int | None = None
    ctx_size: int = 4096
    kv_type: str = "f32"
    flash_attn: bool | None = None
    ubatch: int = 512
    rpc: str | None = None                  # "HOST:PORT[,HOST:PORT...]": ggml RPC workers to offload layers to
    tensor_split: tuple[float, ...] = ()    # share of offloaded layers per device, in ggml's device order
    repack: bool = True                     # CPU weight repacking (llama.cpp's use_extra_bufts): interleaved rows
                                            # for the SIMD GEMM/GEMV kernels; off only to compare against

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.ctx_size < 32:
            raise UsageError(f"--ctx-size must be >= 32, got {self.ctx_size}")
        if self.kv_type not in KV_TYPES:
            raise UsageError(f"--kv-type must be one of {', '.join(KV_TYPES)}, got {self.kv_type!r}")
        if self.ubatch < 32:
            raise UsageError(f"ubatch must be >= 32, got {self.ubatch}")
        if self.rpc is not None:
            from dllm_cli.runtime.rpc import parse_endpoints

            parse_endpoints(self.rpc)
        if any(not (x >= 0 and x < float("inf")) for x in self.tensor_split) or (
                self.tensor_split and not sum(self.tensor_split) > 0):
            raise UsageError(f"--tensor-split takes non-negative finite shares with a positive sum, got "
                             f"{','.join(map(str, self.tensor_split))[:80]}")

    @property
    def n_threads(self) -> int:
        """``threads``, or one per physical core this process may use (``runtime.threads``)."""
        return self.threads or default_threads()


EXACT = RuntimeOptions(kv_type="f32", flash_attn=False)
"""f32 KV cache and no flash attention: the configuration that matches the numpy reference to 1e-4."""

DEFAULT_KV_TYPE = "f32"
"""The default KV cache type. f32 with flash attention (our patched CPU kernel accumulates in f32) deviates from the
exact path by ~1e-6 in logits, where f16 costs ~5e-3 and flips MoE routing near ties; the step time is the same
(docs/PERFORMANCE.md, "Default runtime path"). ``--kv-type f16`` halves the cache for long contexts."""

FLASH_ATTN = {"auto": None, "on": True, "off": False}


def parse_split(text: str | None) -> tuple[float, ...]:
    """``--tensor-split "3,1"`` -> (3.0, 1.0); UsageError on anything else."""
    if not text:
        return ()
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--tensor-split expects comma-separated numbers such as 3,1, got {text[:80]!r}") from None


def from_flags(*, kv_type: str | None = None, flash_attn: str = "auto", exact: bool = False,
               **kwargs: Any) -> RuntimeOptions:
    """RuntimeOptions from the CLI's ``--kv-type``, ``--flash-attn`` and ``--exact`` (plus threads, ctx_size, ...).

    ``exact`` means ``kv_type="f32"`` and flash attention off; an explicit contradicting flag is a UsageError.
    """
    if flash_attn not in FLASH_ATTN:
        raise UsageError(f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
    if exact:
        if kv_type not in (None, "f32") or flash_attn == "on":
            raise UsageError("--exact means --kv-type f32 --flash-attn off", "drop --kv-type/--flash-attn or --exact")
        return RuntimeOptions(kv_type="f32", flash_attn=False, **kwargs)
    if kv_type == "q8_0" and flash_attn == "off":  # known before loading: refuse as a usage error, not after
        raise UsageError("--kv-type q8_0 needs flash attention, but --flash-attn is off",
                         "use --flash-attn on or auto, or --kv-type f16")
    return RuntimeOptions(kv_type=kv_type or DEFAULT_KV_TYPE, flash_attn=FLASH_ATTN[flash_attn], **kwargs)
