"""The GGUF's chat template: untrusted code, rendered in a bounded sandbox, and tokenized so that message
text never becomes control tokens.

**Bounded.** Jinja's ``ImmutableSandboxedEnvironment`` already refuses file/OS access, unsafe attributes and
mutation; on top of it every value a template builds is capped (``range``, ``*``, ``+``, ``%``, ``**``, ``~``,
filters and method calls are checked *before* they allocate), the output is capped while it streams, and a
watchdog thread enforces a wall-clock and a memory-growth budget by raising in the rendering thread (a loop
that allocates nothing still ends). Every failure, from a syntax error to a runaway loop, is one
``ModelError`` line naming the file and the jinja message.

**No injection.** Message contents go through the template with every control-token text in them
(``<|mask|>``, ``<|role_end|>``, ``<role>``...) swapped for a placeholder made of a per-render random number
between two private-use characters. The rendered text is split on the placeholders: the template's text is
tokenized with special-token parsing (its role markers become control ids), each placeholder with parsing
off (the user's ``<|mask|>`` becomes the ordinary tokens ``<``, ``|``, ``mask``...). Content without such
text tokenizes exactly as before, and whatever the template does to the content (strip, split) still applies.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import re
import secrets
import threading
import time
from pathlib import Path
from types import GeneratorType
from typing import Any, Callable, Iterable

import jinja2
import jinja2.ext
import jinja2.sandbox
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat

from dllm_cli.errors import ModelError
from dllm_cli.text import clean_messages, undecodable

MAX_RANGE = 10_000  # items of one range()
MAX_CHARS = 1 << 23  # any one value the template builds, and the whole output (8 Mi characters)
MAX_SECONDS = 2.0  # wall clock for one render (real templates take milliseconds)
MAX_GROWTH = 256 << 20  # resident memory a render may add (bytes, Linux)
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around a placeholder
_FIX = "the template is tokenizer.chat_template inside the GGUF: re-convert the model (`dllm run --raw` skips it)"


class TemplateLimit(jinja2.sandbox.SecurityError):
    """A render went over one of the bounds."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _weight(value: Any) -> int:
    """About the characters ``str(value)`` needs (containers included); stops counting past the cap."""
    total, stack, nodes = 0, [value], 0
    while stack and total <= MAX_CHARS:
        v = stack.pop()
        nodes += 1
        if isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            if len(v) + nodes > 100_000:
                return MAX_CHARS + 1
            total += 2 + 4 * len(v)
            stack.extend(v.items() if isinstance(v, dict) else v)
        else:
            total += 8
    return total


def _big_number(fmt: str) -> bool:
    """A width or precision in a format string above the cap (``'%999999999s'``, ``'{:>999999999}'``)."""
    return any(int(m) > MAX_CHARS for m in re.findall(r"\d{7,}", fmt))


class _Generator(CodeGenerator):
    """``a ~ b`` goes through ``environment.concat_bounded``, which refuses an oversized result before joining."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox with size checks on every operation that can build a large value."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%", "//"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=False, lstrip_blocks=False, extensions=[jinja2.ext.loopcontrols],
                         finalize=_finalize)
        self.globals["range"] = _bounded_range
        self.globals["raise_exception"] = _raise_exception
        self.globals.pop("lipsum", None)  # unbounded text generator; no chat template needs it
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def concat_bounded(parts: Iterable[Any]) -> str:
        parts = list(parts)
        if sum(map(_weight, parts)) > MAX_CHARS:
            raise TemplateLimit(f"a joined string would exceed {MAX_CHARS} characters")
        return "".join(map(str, parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int) and _size(seq) * n > MAX_CHARS:
                    raise TemplateLimit(f"a repeated value would exceed {MAX_CHARS} items")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 1 << 16:
                raise TemplateLimit("a product is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > 1 << 16:
                raise TemplateLimit(f"a power with exponent {right} is too large")
        elif operator == "+":
            if _size(left) + _size(right) > MAX_CHARS:
                raise TemplateLimit(f"a concatenation would exceed {MAX_CHARS} items")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            if (_big_number(left) or any(isinstance(a, int) and abs(a) > MAX_CHARS for a in args)
                    or len(left) + _weight(right) > MAX_CHARS):
                raise TemplateLimit("a formatted string would be too large")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _big_number(value.__self__):

            def refuse(*args: Any, **kwargs: Any) -> str:
                raise TemplateLimit("a format width is too large")
            return refuse
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        args = _materialize(args)
        _check_args(getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if _size(result) > MAX_CHARS:
            raise TemplateLimit(f"a call returned more than {MAX_CHARS} items")
        return result


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}`` before it is turned into text."""
    if not isinstance(value, str) and _weight(value) > MAX_CHARS:
        raise TemplateLimit(f"an output value would exceed {MAX_CHARS} characters")
    return value


def _bounded_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise TemplateLimit(f"range() of {len(rng)} items (at most {MAX_RANGE})")
    return rng


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)  # the convention of HF chat templates


def _check_args(name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before it runs, a call whose result would be oversized (methods and filters alike)."""
    name = name.removeprefix("do_")
    values = [*args, *kwargs.values()]
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS for v in values):
        raise TemplateLimit(f"{name or 'a call'}: an argument above {MAX_CHARS}")
    if sum(_weight(v) for v in values if isinstance(v, (str, list, tuple, dict, set))) > MAX_CHARS:
        raise TemplateLimit(f"{name or 'a call'}: arguments above {MAX_CHARS} characters")
    strs = [v for v in values if isinstance(v, str)]
    if isinstance(obj, str):
        strs.insert(0, obj)
    if any(_big_number(s) for s in strs[:1]) and name in ("format", "format_map"):
        raise TemplateLimit("a format width is too large")
    if name == "replace" and len(strs) >= 3:
        s, old, new = strs[:3]
        n = s.count(old) if old else len(s) + 1
        if len(s) + n * (len(new) - len(old)) > MAX_CHARS:
            raise TemplateLimit(f"replace() would exceed {MAX_CHARS} characters")
    if strs and name in ("expandtabs", "indent", "wordwrap"):
        text = strs[0]
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        pad = max(ints + [len(x) for x in strs[1:]] + [8])  # a tab size, an indent (int or text), a wrap string
        pieces = text.count("\t") + text.count("\n") + 1
        if name == "wordwrap":
            pieces += len(text) // max(min(ints, default=79), 1)
        if len(text) + pieces * pad > MAX_CHARS:
            raise TemplateLimit(f"{name}() would exceed {MAX_CHARS} characters")
    if name in ("tojson", "pprint") and any(isinstance(v, int) and not isinstance(v, bool) for v in values):
        indent = max(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        if sum(_weight(v) for v in values if not isinstance(v, int)) * (indent + 1) > MAX_CHARS:
            raise TemplateLimit(f"{name}() would exceed {MAX_CHARS} characters")
    if name == "join":
        seq = next((v for v in values if isinstance(v, (list, tuple))), ())
        if sum(_size(x) for x in seq) + len(seq) * max(map(len, strs), default=0) > MAX_CHARS:
            raise TemplateLimit(f"join() would exceed {MAX_CHARS} characters")


_EAGER = ("join", "tojson", "pprint", "sum", "sort", "unique")


def _materialize(args: tuple) -> tuple:
    """Generators (``map``, ``select``...) as lists, so the size checks see what a join or a repr would build."""
    out = []
    for a in args:
        if isinstance(a, GeneratorType):
            items = list(itertools.islice(a, MAX_RANGE * 10 + 1))
            if len(items) > MAX_RANGE * 10:
                raise TemplateLimit(f"a sequence of more than {MAX_RANGE * 10} items")
            a = items
        out.append(a)
    return tuple(out)


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja_pass_arg (pass_context / pass_environment)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if name in _EAGER:
            args = _materialize(args)
        _check_args(f.__name__, None, args, kwargs)
        result = f(*args, **kwargs)
        if _size(result) > MAX_CHARS:
            raise TemplateLimit(f"filter {name} returned more than {MAX_CHARS} items")
        return result
    return guarded


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the size checks above still hold


class _Overtime(TemplateLimit):
    def __init__(self, *args: Any) -> None:
        super().__init__(f"rendering took longer than {MAX_SECONDS:g} s")


class _Overweight(TemplateLimit):
    def __init__(self, *args: Any) -> None:
        super().__init__(f"rendering used more than {MAX_GROWTH >> 20} MiB")


class _Watchdog:
    """Wall-clock and memory-growth limits for one render, at no cost to the render itself: a thread polls the
    clock and the resident size, and on a breach raises an exception *in the rendering thread*
    (``PyThreadState_SetAsyncExc``, delivered at its next bytecode), which ends even a loop that calls nothing.
    It fires at most once; ``close`` joins it and drops an exception that was set but not yet delivered."""

    def __init__(self) -> None:
        self.target = threading.get_ident()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="dllm-template-watchdog", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        rss0 = _rss()
        while not self.done.wait(0.005):
            breach = _Overtime if time.monotonic() > deadline else (
                _Overweight if rss0 and _rss() - rss0 > MAX_GROWTH else None)
            if breach is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target), ctypes.py_object(breach))
                return

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target), None)


class ChatTemplate:
    """A compiled chat template of one model file."""

    def __init__(self, source: str, path: Path) -> None:
        self.path = path
        self.env = BoundedSandbox()
        try:
            self.template = self.env.from_string(source)
        except Exception as e:  # TemplateSyntaxError, RecursionError on absurd nesting, ...
            raise self._error(e) from None

    def _error(self, e: BaseException) -> ModelError:
        what = getattr(e, "message", None) or str(e) or type(e).__name__
        line = getattr(e, "lineno", None)
        where = f" (line {line})" if line else ""
        kind = "TemplateLimit" if isinstance(e, TemplateLimit) else type(e).__name__
        text = " ".join(f"{kind}: {what}".split())
        return ModelError(f"the chat template of {self.path} failed{where}: {text}"[:600], _FIX)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text, or a ModelError naming the template (never anything else, never unbounded).

        Undecodable bytes in the messages are U+FFFD by now (``dllm_cli.text``; here without a warning, the
        front end gave it); a template whose own output is not encodable text is refused, naming the file."""
        messages = clean_messages(messages)
        error: Exception | None = None
        dog = _Watchdog()
        try:
            try:
                text = self._generate(messages, add_generation_prompt)
            except Exception as e:  # any error of untrusted code: UndefinedError, SecurityError, TypeError, ...
                error = e
            finally:
                dog.done.set()
        except TemplateLimit as e:  # the watchdog fired just as the render ended
            error = e
        finally:
            dog.close()
        if error is not None:
            raise self._error(error) from None
        if not text.strip():
            raise ModelError(f"the chat template of {self.path} rendered only whitespace", _FIX)
        if undecodable(text):
            raise ModelError(f"the chat template of {self.path} rendered text that is not valid Unicode "
                             "(lone surrogates)", _FIX)
        return text

    def _generate(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        out: list[str] = []
        n = 0
        for chunk in self.template.generate(messages=messages, add_generation_prompt=add_generation_prompt):
            n += len(chunk)
            if n > MAX_CHARS:
                raise TemplateLimit(f"the output exceeds {MAX_CHARS} characters")
            out.append(chunk)
        return "".join(out)

    def token_ids(self, messages: list[dict[str, str]], tokenize: Callable[[str, bool], list[int]],
                  specials: Iterable[str], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize so that only the template's own text can produce control tokens."""
        alternatives = sorted({s for s in specials if s}, key=len, reverse=True)
        if not alternatives:
            return tokenize(self.render(messages, add_generation_prompt), True)
        nonce = f"{secrets.randbelow(10**12):012d}"
        found: list[str] = []

        def hide(m: re.Match[str]) -> str:
            found.append(m.group())
            return f"{_OPEN}{nonce}-{len(found) - 1}{_CLOSE}"

        pattern = re.compile("|".join(map(re.escape, alternatives)))
        hidden = [{**m, "content": pattern.sub(hide, m["content"])} if isinstance(m.get("content"), str) else m
                  for m in messages]
        text = self.render(hidden, add_generation_prompt)
        ids: list[int] = []
        pieces = re.split(f"{_OPEN}{nonce}-(\\d+){_CLOSE}", text)
        for i, piece in enumerate(pieces):
            if i % 2 and int(piece) < len(found):  # a placeholder: the user's control-token text, as plain text
                ids += tokenize(found[int(piece)], False)
            elif i % 2:  # a placeholder the template made up itself: its text, plain
                ids += tokenize(f"{_OPEN}{nonce}-{piece}{_CLOSE}", False)
            elif piece:
                ids += tokenize(piece, True)
        return ids
