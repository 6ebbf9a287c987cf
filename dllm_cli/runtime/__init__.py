"""The patched llama.cpp runtime: library loading, model, session, quantization.

ggml's abort path (``ggml_abort`` -> ``ggml_print_backtrace``) attaches gdb to the dying process, and gdb
writes its backtrace to the inherited *stdout*, where dllm prints only answers. ggml reads
``GGML_NO_BACKTRACE`` with ``getenv`` at abort time, so setting it here, before any library is loaded and
for every entry point that reaches the runtime, keeps native stack dumps off stdout for good. The Python
checks (``hparams``, ``session``) exist so that no abort is reached in the first place.
"""
import os

os.environ.setdefault("GGML_NO_BACKTRACE", "1")
