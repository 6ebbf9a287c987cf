"""Text from model or file data made safe to draw on a terminal.

Token texts, trace pieces, chat templates' output, model and file names can hold any code point, and a
terminal obeys some of them: ESC starts CSI/OSC sequences (colours, cursor moves, the window title, OSC 52
clipboard writes), BEL rings, BS/CR overwrite what was drawn, and the C1 controls U+0080-U+009F (CSI is U+009B)
act like ESC sequences on many terminals. ``printable`` replaces every C0 control (bar the ones kept), DEL and
every C1 control with a visible stand-in, so such text is shown, never obeyed.

The rule (README, "Terminal safety"): everything dllm *draws* for a person (the live view, ``--replay``, chat's
rendered answer and stats, warnings and error lines) goes through this, via ``cli/output.py``'s consoles. What
dllm writes as *data* (``dllm run``'s answer on stdout, ``--json``, ``--trace``, the chat's answer when stdout is
a pipe or file) stays byte-exact: pipelines get the model's text as it is.
"""
from __future__ import annotations

C1_STANDIN = "\ufffd"  # U+FFFD: a C1 control has no picture of its own


def _table(keep: str) -> dict[int, str]:
    table = {c: chr(0x2400 + c) for c in range(0x20)}  # U+2400..U+241F: ␀ ... ␛ ... ␟
    table[0x7F] = "\u2421"  # ␡
    table.update({c: C1_STANDIN for c in range(0x80, 0xA0)})
    for ch in keep:
        table.pop(ord(ch), None)
    return table


_KEEP_LINES = _table("\n\t")
_ONE_LINE = _table("")


def printable(text: str, *, lines: bool = True) -> str:
    """``text`` with every control character replaced by a visible stand-in (ESC -> ``␛``, BEL -> ``␇``,
    CR -> ``␍``, DEL -> ``␡``, U+0080-U+009F -> ``\ufffd``). With ``lines`` (default) newline and tab stay;
    without, they are replaced too (one cell, one line)."""
    return text.translate(_KEEP_LINES if lines else _ONE_LINE)


def is_printable(text: str, *, lines: bool = True) -> bool:
    """True when ``printable(text, lines=lines)`` would change nothing."""
    table = _KEEP_LINES if lines else _ONE_LINE
    return not any(ord(ch) in table for ch in text)
