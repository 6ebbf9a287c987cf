"""The chat template is untrusted code from the GGUF: every failure is one ModelError naming the template, and
rendering is bounded in time, size and memory (``dllm_cli/runtime/template.py``)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dllm_cli import gguf_keys as K
from dllm_cli.errors import ModelError
from dllm_cli.runtime.template import MAX_SECONDS, ChatTemplate
from gguf_edit import rewrite

DLLM = str(Path(sys.executable).with_name("dllm"))
MSGS = [{"role": "user", "content": "hi"}]
BIG = "{% set s = 'x' * 1000000 %}"

# template -> text the one-line message must contain
FAILING = {
    "{{ raise_exception('no system role allowed') }}": "no system role allowed",
    "{{ foo.bar }}": "UndefinedError",
    "{{ messages[0].content.nope() }}": "UndefinedError",
    "{% for %}": "TemplateSyntaxError",
    "{% if x %}never closed": "TemplateSyntaxError",
    "{{ 'a' + }}": "TemplateSyntaxError",
    "{% include 'other.jinja' %}": "no loader",
    "{% import 'macros' as m %}{{ m.x() }}": "no loader",
    "{% extends 'base' %}": "no loader",
    "{{ ''.__class__.__mro__ }}": "SecurityError",
    "{{ cycler.__init__.__globals__ }}": "SecurityError",
    "{{ messages.append(1) }}": "SecurityError",
    "{{ 1 // 0 }}": "ZeroDivisionError",
    "{{ [1, 2][5] }}": "only whitespace",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": "RecursionError",
    "{{ lipsum(n=100000) }}": "lipsum",
    # bounds: each of these used to hang for minutes or be killed for memory
    "{% for i in range(10**9) %}x{% endfor %}": "TemplateLimit",
    "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}": "longer than",
    "{% for i in range(9999) %}{% for j in range(9999) %}x{% endfor %}{% endfor %}": "TemplateLimit",
    "{{ 'x' * 10**10 }}": "TemplateLimit",
    "{{ ['x'] * 10**9 }}": "TemplateLimit",
    "{{ 10 ** 100000000 }}": "TemplateLimit",
    "{{ ((10 ** 1000) ** 1000) ** 1000 }}": "TemplateLimit",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "TemplateLimit",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": "TemplateLimit",
    "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": "TemplateLimit",
    "{{ 'x' | center(10**10) }}": "TemplateLimit",
    "{{ 'x'.ljust(10**10) }}": "TemplateLimit",
    "{{ '%999999999s' | format('x') }}": "TemplateLimit",
    "{{ '%999999999s' % 'x' }}": "TemplateLimit",
    "{{ '{:>999999999}'.format('x') }}": "TemplateLimit",
    "{{ '{:>{}}'.format('x', 10**9) }}": "TemplateLimit",
    BIG + "{{ s | replace('x', s) }}": "TemplateLimit",
    BIG + "{{ s.replace('x', s) }}": "TemplateLimit",
    BIG + "{{ ([s] * 1000) | join }}": "TemplateLimit",
    BIG + "{{ ([s] * 1000) | map('upper') | join }}": "TemplateLimit",
    BIG + "{{ [s] * 1000 }}": "TemplateLimit",
    BIG + "{{ ([s] * 1000) | tojson }}": "TemplateLimit",
    BIG + "{{ ([s] * 1000) | string }}": "TemplateLimit",
    BIG + "{% set l = [s] * 100 %}{{ [l] * 100 }}": "TemplateLimit",
    "{% set s = 'x\n' * 1000000 %}{{ s | indent(1000) }}": "TemplateLimit",
    BIG + "{{ s | wordwrap(1, wrapstring='y' * 1000) }}": "TemplateLimit",
    "{% set s = '\t' * 1000000 %}{{ s.expandtabs(1000) }}": "TemplateLimit",
    "{% for i in range(9000) %}{{ 'x' * 1000000 }}{% endfor %}": "output exceeds",
    # a template that renders nothing but whitespace names the template, not "the prompt is empty"
    "   \n\t ": "only whitespace",
    "{% for m in messages %} {% endfor %}\n": "only whitespace",
}


@pytest.mark.parametrize("source", list(FAILING))
def test_bad_templates_are_one_model_error_line(source):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        ChatTemplate(source, Path("/models/m.gguf")).render(MSGS)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert FAILING[source] in msg and "/models/m.gguf" in msg and "chat template" in msg, msg
    assert "\n" not in msg and len(msg) < 1000
    assert elapsed < MAX_SECONDS + 1.5, elapsed
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is KiB on Linux
    assert grown_mb < 600, grown_mb


GOOD = {
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}": "<user>hi",
    "{% for m in messages %}{{ m.content | trim | upper }}{% endfor %}{% if add_generation_prompt %}!{% endif %}": "HI!",
    "{% for i in range(3) %}{{ i }}{% endfor %}{{ messages | length }}": "0121",
    "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% endfor %}ok": "ok",
    "{{ '%s-%d' % ('a', 3) }} {{ '{}!'.format('b') }} {{ ['x', 'y'] | join(',') }}": "a-3 b! x,y",
    "{% set ns = namespace(s='') %}{% for i in range(200) %}{% set ns.s = ns.s ~ 'ab' %}{% endfor %}{{ ns.s | length }}":
        "400",
}


@pytest.mark.parametrize("source", list(GOOD))
def test_ordinary_templates_still_render(source):
    assert ChatTemplate(source, Path("m.gguf")).render(MSGS) == GOOD[source]


def test_a_stopped_render_leaves_no_pending_exception():
    """The watchdog raises inside the rendering thread; nothing of it may surface after render returns."""
    slow = ChatTemplate("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}", Path("m"))
    fast = ChatTemplate("{% for i in range(2000) %}{{ i }}{% endfor %}", Path("m"))
    for _ in range(3):
        with pytest.raises(ModelError, match="longer than"):
            slow.render(MSGS)
        total = 0
        deadline = time.monotonic() + 0.3  # longer than the watchdog's poll interval
        while time.monotonic() < deadline:
            total += len(fast.render(MSGS))
        assert total > 0


# --- through the CLI (the template lives in the GGUF; Model needs the runtime before it renders) ---------------
def _runtime_missing() -> str | None:
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        return str(e)
    return None


CLI = {
    "{{ raise_exception('bad template') }}": "bad template",
    "{% for %}": "TemplateSyntaxError",
    "{{ foo.bar }}": "UndefinedError",
    "{% include 'x' %}": "no loader",
    "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}": "longer than",
    "{{ 'x' * 10**10 }}": "TemplateLimit",
    "  \n ": "only whitespace",
}


@pytest.mark.skipif(_runtime_missing() is not None, reason="no patched runtime")
@pytest.mark.parametrize("source", list(CLI))
def test_cli_reports_a_bad_template_in_one_line(tmp_path, source):
    from dllm_cli.registry import embedded_model_path

    bad = rewrite(embedded_model_path(), tmp_path / "t.gguf", set={K.CHAT_TEMPLATE: source})
    r = subprocess.run([DLLM, "run", str(bad), "What is 2 + 2?"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env=dict(os.environ, DLLM_DEBUG="0"))
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stderr[-1000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and CLI[source] in lines[0] and "chat template" in lines[0], r.stderr
    assert "internal error" not in r.stderr and "prompt is empty" not in r.stderr
