"""Pydantic request models for the OpenAI-compatible API, and OpenAI-shaped errors.

Unknown fields are ignored (as OpenAI's server does, for forward compatibility); values out of
range are rejected with a 400 naming the field. Every bound here is the one the engine enforces
(SamplingParams), so the OpenAPI document tells clients the truth; what depends on the served
model (the vocabulary, the context) is checked by the handler and answered with a 400 too.
Responses are built as plain dicts in protocol.py and described by server/responses.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tierserve.request import MAX_LOGPROBS, SEED_MAX, SEED_MIN


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a JSON value (keys too) holds an unpaired surrogate. Walked with
    a stack, not recursion: a small body can nest thousands of levels deep."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= ch <= "\udfff" for ch in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class _Body(_Lenient):
    """A request body: its text must be real Unicode. JSON lets a string carry an unpaired
    UTF-16 surrogate (``"\\ud800"``), which no tokenizer takes and no UTF-8 encoder writes."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):
            raise ValueError("a string holds an unpaired UTF-16 surrogate (e.g. \\ud800): "
                             "not valid Unicode text")
        return data


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    """A call the assistant made earlier in the conversation (sent back by the client)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


NonNegInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0, le=SEED_MAX, description="a token id of the served model's "
                               "vocabulary (GET /tokenizer_info; a larger one is a 400)")]
StopString = Annotated[str, Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]


class JsonSchemaFormat(_Lenient):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """OpenAI's response_format: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Lenient):
    """vLLM's structured_outputs: exactly one of json, json_object, regex, choice, grammar."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[Text] | None = None
    grammar: str | None = None


class SamplingFields(_Body):
    """Fields shared by chat and text completions (tierserve extensions at the end)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: StopString | list[StopString] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description=(
        "a signed 64-bit integer; the same seed gives the same text whatever else runs"))] | None \
        = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # tierserve extensions (vLLM-compatible names)
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    priority: Annotated[int, Field(gt=-(2**31), lt=2**31, description=(
        "vLLM's extension: lower values are scheduled first; larger magnitudes are reserved "
        "(the Batch API's background requests run at 2**31)"))] = 0
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    stop_token_ids: list[TokenId] | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (at most one of them).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, description=(
        "vLLM's extension: log-probabilities of the prompt's tokens with this many top "
        "alternatives (the prompt is then computed whole, without a prefix-cache hit)"))] | None \
        = None


class FunctionDefinition(_Lenient):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class CompletionRequest(SamplingFields):
    prompt: (Text | Annotated[list[Text], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: Annotated[int, Field(ge=0, description=(
        "0 generates nothing: with echo and logprobs it scores the prompt"))] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text, or a conversation rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
