"""Request bodies of the OpenAI-compatible routes as pydantic models.

Every model forbids unknown fields, so a field kvserve does not implement (tools,
logit_bias, n > 1, ...) is a 400 naming it, never silently ignored; /openapi.json is
generated from these same models, so it lists exactly what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOP_LOGPROBS = 20
# OpenAI fields kvserve does not implement. Some clients send them empty by default; a null
# or empty value asks for nothing, so it is taken as not given. Any other value is refused.
UNSUPPORTED_WHEN_SET = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "parallel_tool_calls",
    "suffix",
    "metadata",
    "store",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class TextResponseFormat(_Strict):
    type: Literal["text"]


class JsonObjectResponseFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: Annotated[str, Field(max_length=64)] = "schema"
    description: str | None = None
    # "schema" is a BaseModel attribute, hence the alias
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextResponseFormat | JsonObjectResponseFormat | JsonSchemaResponseFormat,
    Field(discriminator="type"),
]


class _Sampling(_Strict):
    """The fields chat and completions share, OpenAI's and kvserve's own (extra body)."""

    model: str
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Literal[1] = Field(1, description="only 1: parallel sampling is not supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # kvserve's own, sent by OpenAI clients as extra_body
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None
    cache_salt: Annotated[str, Field(max_length=1024)] | None = None
    return_token_ids: bool = Field(
        False, description="add the generated token ids to each choice (kvserve)"
    )
    # structured outputs: the output is JSON (any object, or valid against a schema)
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            empty = [k for k in UNSUPPORTED_WHEN_SET if k in data and _asks_nothing(k, data[k])]
            if empty:
                data = {k: v for k, v in data.items() if k not in empty}
        return data


def _asks_nothing(key: str, value: Any) -> bool:
    return value is None or value in ({}, [], False) or (key == "tool_choice" and value == "none")


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class CompletionRequest(_Sampling):
    # one prompt: text or token ids, bare or as a one-element list (the SDK's shapes);
    # a batch of several is refused (n and batches are one request each here)
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: Literal[False] = False
    best_of: Literal[1] | None = None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
