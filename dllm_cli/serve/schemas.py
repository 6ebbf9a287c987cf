"""Request bodies of the OpenAI-compatible endpoints (pydantic), and the dllm extension object.

Types are strict, as OpenAI's are: ``max_tokens: true`` or ``stream: "yes"`` is a 400 naming the field, never
coerced. Unknown fields are ignored, as OpenAI's server does; ranges are checked here so a bad value is a 400
naming the field. dllm's own knobs live under one key, ``"dllm"``, so they never collide with OpenAI's.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from dllm_cli.domains import INT32_MAX


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class DllmOptions(_Body):
    """``"dllm": {...}``: decode preset and knobs of this request, and whether to stream step events."""

    mode: Optional[Literal["speed", "quality"]] = None
    threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    editing_threshold: Optional[float] = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_post_steps: Optional[int] = Field(default=None, ge=0)
    editing: Optional[bool] = None
    indel: Optional[bool] = None  # LLaDA2.2 DELETE/INSERT edits
    block_length: Optional[int] = Field(default=None, ge=1)
    top_k: Optional[int] = Field(default=None, ge=0, le=INT32_MAX)
    events: bool = False  # stream each decoding step as an ``event: dllm.step`` SSE event


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class FunctionDef(_Body):
    model_config = ConfigDict(extra="allow", strict=True)  # kept as given: the model sees the definition verbatim
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**64)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    dllm: DllmOptions = DllmOptions()  # pydantic copies defaults per instance
    response_format: Optional[dict[str, Any]] = None  # text | json_object | json_schema (serve/constrain.py)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: bool = False
