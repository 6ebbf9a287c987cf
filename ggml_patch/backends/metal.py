"""Apple's Metal backend: flags only. It has never been built or run by this project (no macOS machine); ggml
builds it by default on macOS, where ``auto`` picks it."""
from __future__ import annotations

import sys

from ggml_patch.backends.base import Backend


class MetalBackend(Backend):
    name = "metal"
    flags = ("-DGGML_METAL=ON",)
    auto_help = "metal on macOS"

    def present(self) -> bool:
        return sys.platform == "darwin"


METAL = MetalBackend()
