"""OpenAI API request and response types (what shrinkserve serves). No serving logic here.

Requests forbid unknown fields: a field we do not implement is a 400 naming it, never silently dropped
(docs/openai-fields.md lists every OpenAI field and its status). Fields OpenAI defines that we cannot honour
are declared with the only values that mean "off" (their schema says so, e.g. `audio: null`), and any other
value is a 400 that says why (`_unsupported`). Harmless metadata (`user`, `metadata`, `store`, ...) is
accepted and has no effect. Every string of a request is made valid Unicode first: lone UTF-16 surrogates
(`"\\ud800"` is valid JSON) become U+FFFD, so they can never reach a tokenizer or an encoder.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

# --------------------------------------------------------------------------- input hygiene


def valid_text(s: str) -> str:
    """`s` with every lone surrogate replaced by U+FFFD (a valid pair was already joined by the JSON parser)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def valid_strings(value: Any) -> Any:
    """Every string in a parsed JSON document (keys too) through `valid_text`; iterative, so no depth limit."""
    if isinstance(value, str):
        return valid_text(value)
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]
    while stack:
        parent, key, node = stack.pop()
        if isinstance(node, dict):
            fixed: dict[Any, Any] = {}
            for k, v in node.items():
                fixed[valid_text(k) if isinstance(k, str) else k] = v
            parent[key] = fixed
            for k, v in fixed.items():
                if isinstance(v, str):
                    fixed[k] = valid_text(v)
                elif isinstance(v, dict | list):
                    stack.append((fixed, k, v))
        elif isinstance(node, list):
            copy = list(node)
            parent[key] = copy
            for i, v in enumerate(copy):
                if isinstance(v, str):
                    copy[i] = valid_text(v)
                elif isinstance(v, dict | list):
                    stack.append((copy, i, v))
    return root[0]


class Strict(BaseModel):
    """A request object: unknown fields are errors (400 naming them), never ignored."""

    model_config = ConfigDict(extra="forbid")


class RequestBody(Strict):
    """The top of a request document: strings made valid before anything else looks at them."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return valid_strings(data)


def _unsupported(reasons: dict[str, str]) -> Any:
    """A wrap validator for fields declared with their "off" values only: any other value is refused with
    the reason (instead of pydantic's "Input should be None")."""

    def check(cls: type, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except Exception:
            name = info.field_name or "this field"
            raise ValueError(f"{name} is not supported by shrinkserve: {reasons[name]}") from None

    return field_validator(*reasons, mode="wrap")(check)


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # logit_bias keys: token ids in decimal
Bias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]
MAX_N = 16  # choices per prompt; admission still bounds how many run at once


# --------------------------------------------------------------------------- shared request parts


class StreamOptions(Strict):
    include_usage: bool | None = False
    # OpenAI pads streamed events against side channels; a self-hosted server has nothing to hide.
    include_obfuscation: bool | None = None


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; omitted = no arguments
    strict: bool | None = None


class ToolDefinition(Strict):
    type: Literal["function"]
    function: FunctionDefinition

    @field_validator("type", mode="before")
    @classmethod
    def _function_only(cls, v: Any) -> Any:
        if v != "function":
            raise ValueError(f"tool type {v!r} is not supported; only 'function' tools are")
        return v


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class AllowedToolRef(Strict):
    type: Literal["function"]
    function: FunctionName


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[AllowedToolRef] = Field(min_length=1)


class AllowedToolsChoice(Strict):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoiceParam = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(Strict):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` extension: exactly one constraint on the output."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")  # a schema, or its JSON text
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None  # Lark (llguidance's dialect)
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _SamplingRequest(RequestBody):
    """What chat and completions share: the model, sampler parameters, stop, streaming, metadata."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[NonEmptyStr] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # token id (decimal string) → bias; ids are checked against the profile's vocabulary when served
    logit_bias: dict[TokenIdKey, Bias] | None = None
    # vLLM's extensions (their names and ranges)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: bool | None = False  # keep generating past end-of-sequence (benchmarks want exact lengths)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # metadata: llguidance is the only backend
    # harmless metadata: accepted, no effect
    user: str | None = None
    # vLLM flags accepted at the only values shrinkserve implements
    skip_special_tokens: Literal[True] | None = None
    include_stop_str_in_output: Literal[False] | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "skip_special_tokens": "special tokens are never written to the output",
        "include_stop_str_in_output": "the stop string is never included in the output",
    }
    check_unsupported_shared = _unsupported(UNSUPPORTED)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @model_validator(mode="after")
    def _one_structure(self) -> _SamplingRequest:
        given = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                   "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None and not (
                     name == "response_format" and isinstance(self.response_format, ResponseFormatText))]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(given)}")
        so = self.structured_outputs
        if so is not None:
            kinds = [k for k in ("json_", "json_object", "regex", "choice", "grammar")
                     if getattr(so, k) not in (None, False)]
            if len(kinds) != 1:
                raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# --------------------------------------------------------------------------- completions


class CompletionRequest(_SamplingRequest):
    # A prompt that is empty, or tokenizes to nothing, is a 400 (there is nothing to continue from).
    prompt: (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "suffix": "no fill-in-the-middle",
        "best_of": "generate n and pick on the client",
    }
    check_unsupported_completion = _unsupported(UNSUPPORTED)

    @field_validator("prompt", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        # Said plainly here: the union's own errors would name a member type instead.
        if v == "" or v == []:
            raise ValueError("the prompt must not be empty")
        if isinstance(v, list) and any(p == "" or p == [] for p in v):
            raise ValueError("a prompt in the list is empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- chat


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(Strict):
    name: str
    arguments: str  # a JSON string, as OpenAI writes it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _Message(Strict):
    """What every chat message has; one model per role below (OpenAI's own split), so the schema says
    which fields go with which role."""

    content: str | list[TextPart] | None = None
    name: str | None = None  # metadata: the models' templates have no slot for a participant name

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for j, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content[{j}]: only text content parts are supported, not {kind!r}")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_openai(self) -> dict[str, Any]:
        """The message as a plain OpenAI dict (what serving/tools/ renders)."""
        return self.model_dump(exclude_none=True, include={"role", "content", "name", "tool_calls", "tool_call_id"})

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls of an assistant turn (none for other roles)."""
        return getattr(self, "tool_calls", None) or []


class SystemMessage(_Message):
    role: Literal["system"]
    content: str | list[TextPart]


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantTurn(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None
    # what an assistant message of a response carries when a client sends it back as history
    refusal: None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "refusal": "no refusal messages", "audio": "no audio", "function_call": "use tool_calls",
    }
    check_unsupported_message = _unsupported(UNSUPPORTED)


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantTurn | ToolMessage,
                        Field(discriminator="role")]
_CHAT_MESSAGE: TypeAdapter[Any] = TypeAdapter(ChatMessage)


def chat_message(**fields: Any) -> _Message:
    """One chat message from its fields (the role picks the type)."""
    return _CHAT_MESSAGE.validate_python(fields)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None
    # harmless metadata: accepted, no effect
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = None
    verbosity: Literal["medium"] | None = None
    add_generation_prompt: Literal[True] | None = None  # vLLM
    # OpenAI fields with nothing behind them here: only their "off" value
    audio: None = None
    functions: None = None
    function_call: None = None
    prediction: None = None
    reasoning_effort: None = None
    web_search_options: None = None
    moderation: None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "audio": "no audio output",
        "functions": "deprecated by OpenAI; use tools",
        "function_call": "deprecated by OpenAI; use tool_choice",
        "prediction": "no predicted outputs",
        "reasoning_effort": "not a reasoning model",
        "web_search_options": "no built-in tools",
        "moderation": "no moderation models",
        "modalities": "text output only",
        "verbosity": "no verbosity control ('medium' or null only)",
        "add_generation_prompt": "the assistant turn is always opened",
    }
    check_unsupported_chat = _unsupported(UNSUPPORTED)

    @model_validator(mode="after")
    def _cross_fields(self) -> ChatCompletionRequest:
        # top_logprobs: 0 without logprobs asks for nothing, and clients send it (accepted); more needs logprobs.
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


# --------------------------------------------------------------------------- responses (a stateless adapter over chat)


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputText(Strict):
    """An assistant output part sent back as history (annotations and logprobs are ignored there)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


ContentPartR = Annotated[InputText | OutputText, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPartR]
    id: str | None = None  # metadata of an output item sent back as history
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for j, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text"):
                    raise ValueError(f"content[{j}]: only input_text/output_text parts are supported, not {kind!r}")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


_ITEM_TYPES = {"message", "function_call", "function_call_output"}


def _item_kind(v: Any) -> str | None:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None) or "message"
    return kind if isinstance(kind, str) and kind in _ITEM_TYPES else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _function_only(cls, v: Any) -> Any:
        if v != "function":
            raise ValueError(f"tool type {v!r} is not supported; only 'function' tools are (no built-in tools)")
        return v


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class AllowedFunctionRef(Strict):
    type: Literal["function"]
    name: str


class AllowedToolsR(Strict):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedFunctionRef] = Field(min_length=1)


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJSONObject(Strict):
    type: Literal["json_object"]


class TextFormatJSONSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesStreamOptions(Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(RequestBody):
    """OpenAI's Responses API, stateless: the whole conversation comes in `input` every time."""

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | AllowedToolsR | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[Literal["message.output_text.logprobs"]] | None = None
    truncation: Literal["disabled"] | None = None
    # harmless metadata: accepted, no effect
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    store: bool | None = None  # nothing is ever stored; the response says store: false
    background: Literal[False] | None = None
    # a stateless server without reasoning or server-side tools: only the "off" values
    previous_response_id: None = None
    conversation: None = None
    background_options: None = None
    context_management: None = None
    prompt: None = None
    reasoning: None = None
    max_tool_calls: None = None
    moderation: None = None
    image: None = None
    access_programs: None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "include": "only 'message.output_text.logprobs' can be included",
        "truncation": "'disabled' only: a prompt over the context is a 400",
        "background": "no background responses",
        "previous_response_id": "the server is stateless; send the whole conversation in input",
        "conversation": "the server is stateless; send the whole conversation in input",
        "background_options": "no background responses",
        "context_management": "no server-side context management",
        "prompt": "no stored prompts",
        "reasoning": "not a reasoning model",
        "max_tool_calls": "no built-in tools",
        "moderation": "no moderation models",
        "image": "no image generation",
        "access_programs": "no programmatic tool calling",
    }
    check_unsupported_responses = _unsupported(UNSUPPORTED)

    @field_validator("input", mode="before")
    @classmethod
    def _item_types(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, item in enumerate(v):
                kind = item.get("type", "message") if isinstance(item, dict) else None
                if not isinstance(kind, str) or kind not in _ITEM_TYPES:
                    raise ValueError(f"input[{i}]: item type {kind!r} is not supported (message, function_call "
                                     "and function_call_output are; the server keeps no state)")
        return v

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])


# --------------------------------------------------------------------------- tokenizer endpoints


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ToolCallDeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class GateStatus(BaseModel):
    """The profile's quality gate: its limits and, once measured, whether it passes them."""

    limits: dict[str, float]
    passed: bool | None = None  # None until the profile has been evaluated
    failures: list[str] = Field(default_factory=list)
    served_anyway: bool = False


class ModelCard(BaseModel):
    """One profile as `/v1/models` shows it; the shrinkserve fields extend OpenAI's model object."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shrinkserve"
    root: str
    method: str
    engine: str
    state: str
    error: str | None = None
    bytes_on_disk: int | None = None
    resident_memory_bytes: int | None = None
    context_length: int | None = None
    max_model_len: int | None = None
    routes: list[str] = Field(default_factory=list)
    quality: dict[str, Any] | None = None  # the evaluation record against the base; None until measured
    # measured | evaluating | pending (it will be: evaluations run when requests leave the cores free) | off
    quality_status: Literal["measured", "evaluating", "pending", "off"] = "off"
    gate: GateStatus | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------- responses: output


class ResponseTopLogprob(BaseModel):
    token: str
    bytes: list[int]
    logprob: float


class ResponseLogprob(ResponseTopLogprob):
    top_logprobs: list[ResponseTopLogprob] = Field(default_factory=list)


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ResponseLogprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputTextPart]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"] | None = None


class ResponseObject(BaseModel):
    """OpenAI's Response object (the fields a stateless server can fill)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    model: str
    output: list[Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]]
    parallel_tool_calls: bool
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any
    tools: list[dict[str, Any]]
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    previous_response_id: None = None
    reasoning: None = None
    store: bool = False
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    user: str | None = None
    usage: ResponseUsage | None = None
