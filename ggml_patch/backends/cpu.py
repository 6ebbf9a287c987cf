"""The CPU backend: ggml-cpu built for this machine (``GGML_NATIVE``, see ``cpu_features``); always present."""
from __future__ import annotations

from ggml_patch.backends.base import Backend


class CpuBackend(Backend):
    name = "cpu"
    auto_help = "otherwise cpu"

    def present(self) -> bool:
        return True


CPU = CpuBackend()
