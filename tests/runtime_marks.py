"""``needs_runtime``: skip (with the reason) a test that needs the patched runtime when none is built."""
from __future__ import annotations

import pytest


def runtime_missing() -> str | None:
    """Why the current patches have no usable runtime here, or None when one is installed."""
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        return str(e)
    return None


needs_runtime = pytest.mark.skipif(runtime_missing() is not None, reason=str(runtime_missing()))
