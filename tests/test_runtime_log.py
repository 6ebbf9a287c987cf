"""llama.cpp's log goes through one callback (``dllm_cli.runtime.library``): silent on stderr unless asked, always
readable through ``captured_log``. ``dllm bench`` silences it with ``set_log_echo`` rather than a callback of its own,
which once made every later ``captured_log`` in the process come back empty (the Q6_K repack test after a bench)."""
from __future__ import annotations

from runtime_marks import needs_runtime

pytestmark = needs_runtime


def _load_embedded(log_lines: list[str]) -> None:
    from dllm_cli.registry import embedded_model_path
    from dllm_cli.runtime.library import captured_log
    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.options import RuntimeOptions

    with captured_log() as log:
        Model(embedded_model_path(), RuntimeOptions(threads=1)).close()
    log_lines.extend(log)


def test_bench_silencing_keeps_the_log_capturable_and_off_stderr(capfd):
    from dllm_cli.bench.measure import quiet_llama_log
    from dllm_cli.runtime.library import set_log_echo

    quiet_llama_log()
    try:
        lines: list[str] = []
        _load_embedded(lines)
        assert any("llama_model_loader" in t for t in lines), lines[:5]
        assert "llama_model_loader" not in capfd.readouterr().err
    finally:
        set_log_echo(None)


def test_log_echo_on_reaches_stderr(capfd):
    from dllm_cli.runtime.library import set_log_echo

    set_log_echo(True)
    try:
        lines: list[str] = []
        _load_embedded(lines)
        assert "llama_model_loader" in capfd.readouterr().err
    finally:
        set_log_echo(None)
