"""``dllm serve``'s pure parts: LLaDA2 tool rendering and parsing, stop strings over block-final text."""
from __future__ import annotations

import json

import jinja2
import pytest

from dllm_cli.decoding.events import DoneEvent
from dllm_cli.demo.tokenizer import CHAT_TEMPLATE
from dllm_cli.serve.completion import Tally, TextStream, conclude
from dllm_cli.serve.server import is_loopback
from dllm_cli.serve.tools import parse_tool_calls, template_messages, tools_block

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def render(messages):
    return jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_tools_conversation_renders_as_the_official_llada2_template_does():
    """Spec §4: tools block after the system prompt, calls as <tool_call> JSON, one OBSERVATION turn per run."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
    ]
    block = tools_block([WEATHER])
    expected = (
        "<role>SYSTEM</role>Be brief.\n" + block + "detailed thinking off<|role_end|>"
        "<role>HUMAN</role>Weather in Paris and Rome?<|role_end|>"
        "<role>ASSISTANT</role><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|role_end|>"
        "<role>OBSERVATION</role>\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|role_end|><role>ASSISTANT</role>")
    assert render(template_messages(messages, [WEATHER])) == expected
    assert block.startswith("# Tools\n\nYou may call one or more functions") and block.endswith("</tool_call>\n")
    assert "\n" + json.dumps(WEATHER) + "\n</tools>" in block


def test_tools_without_a_system_prompt_get_the_system_turn_alone():
    out = render(template_messages([{"role": "user", "content": "hi"}], [WEATHER]))
    assert out == ("<role>SYSTEM</role>" + tools_block([WEATHER]) + "detailed thinking off<|role_end|>"
                   "<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>")
    assert render(template_messages([{"role": "user", "content": "hi"}], None)) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>")


def test_tool_calls_are_parsed_into_openai_calls():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    two = parse_tool_calls('<tool_call>{"name": "a", "arguments": "{}"}</tool_call><tool_call>{"name": "b"}</tool_call>')
    assert [c["function"] for c in two[1]] == [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": "{}"}]


@pytest.mark.parametrize("text", [
    "plain answer",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par\n</tool_call>",  # broken JSON
    "<tool_call>\n{\"name\": \"get_weather\"",  # never closed
    "<tool_call>[1, 2]</tool_call>",  # not an object
    "<tool_call>{\"arguments\": {}}</tool_call>",  # no name
    "<tool_call>{\"name\": \"a\"}</tool_call> and <tool_call>oops",  # one good, one unclosed
])
def test_malformed_tool_calls_stay_text(text):
    assert parse_tool_calls(text) is None


def test_stop_string_split_across_blocks_is_cut_exactly_and_never_sent():
    s = TextStream(["STOP"])
    sent = [s.feed("Hello ST"), s.feed("OP and more"), s.feed("ignored")]
    assert sent == ["Hello ", "", ""] and s.stopped and s.text == "Hello "
    s = TextStream(["STOP"])
    assert s.feed("a S") == "a " and s.feed("x") == "Sx" and s.finish() == "" and not s.stopped
    s = TextStream(["END"])
    assert s.feed("tail E") == "tail " and s.finish() == "E"  # a held prefix is released at the end


def test_held_tool_call_becomes_calls_or_text_at_the_end():
    s = TextStream([], hold_tool_calls=True)
    assert s.feed("Checking.\n<tool") == "Checking.\n"
    assert s.feed('_call>{"name": "f", "arguments": {"x": 1}}</tool_call>') == ""
    outcome, rest = conclude(s, Tally())
    assert outcome.finish_reason == "tool_calls" and rest == "" and outcome.content == "Checking.\n"
    assert outcome.tool_calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    s = TextStream([], hold_tool_calls=True)
    s.feed("<tool_call>{not json</tool_call>")
    tally = Tally()
    tally.update(DoneEvent((1, 2), "", 3, "eos", 1, 1, 1, 0, 2.0, 0.1))
    outcome, rest = conclude(s, tally)
    assert outcome.tool_calls is None and outcome.finish_reason == "stop"
    assert outcome.content == rest == "<tool_call>{not json</tool_call>"


def test_only_loopback_hosts_count_as_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "example.com", "::"))
