"""The OpenAI wire format: request and response schemas, validated at the edge (chat, completions, models,
errors, and the audio endpoints' form fields and replies)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer,
                      model_validator)

MAX_STOP_STRINGS = 4


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str  # a data: URL or an https:// address
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]

# what the server passes to a chat template itself: a request's template variables may not set them
TEMPLATE_ARGUMENTS = frozenset({"messages", "conversation", "tools", "documents", "chat_template", "tokenize",
                                "add_generation_prompt", "continue_final_message", "return_dict", "tokenizer_kwargs"})


def template_variables(variables: dict[str, Any] | None) -> dict[str, Any] | None:
    taken = sorted(TEMPLATE_ARGUMENTS & set(variables or ()))
    if taken:
        raise ValueError(f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the server, not by "
                         "chat_template_kwargs")
    return variables


# vLLM's chat_template_kwargs: variables for the chat template (Qwen3's enable_thinking, ...)
TemplateVariables = Annotated[dict[str, Any] | None, AfterValidator(template_variables)]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    def image_parts(self) -> list[int]:
        """Where in content the images are."""
        parts = self.content if isinstance(self.content, list) else []
        return [index for index, part in enumerate(parts) if isinstance(part, ImagePart)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolName


class R1Settings(BaseModel):
    """The reference proxy's settings for R1-style reasoning models."""
    return_think_data: bool = True
    few_shot_mode: Literal["DROP", "PREPROCESS", "NO_PREPROCESS"] = "NO_PREPROCESS"
    math_mode: bool = False


def not_supported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported yet by this server")


GUIDED_KINDS = ("json", "regex", "choice", "grammar")


class StructuredOutputs(BaseModel):
    """vLLM's newer spelling of the guided_* fields, as one object; its backend options are ignored."""
    model_config = ConfigDict(populate_by_name=True)
    json_: dict | str | None = Field(default=None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None

    @field_validator("structural_tag")
    @classmethod
    def structural_tag_refused(cls, tag: str | dict | None) -> None:
        if tag is not None:
            raise not_supported("structural_tag")

    def constraints(self) -> list[tuple[str, str, object]]:
        given = [(kind, f"structured_outputs.{kind}", getattr(self, "json_" if kind == "json" else kind))
                 for kind in GUIDED_KINDS]
        if self.json_object:
            given.append(("json", "structured_outputs.json_object", {"type": "object"}))
        return [constraint for constraint in given if constraint[2] is not None]


class SamplingRequest(BaseModel):
    """Fields shared by chat and completions. Unknown fields that cannot change the output are ignored;
    known ones this server cannot honour are refused."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logit_bias: dict[int, float] | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    seed: int | None = None
    speculative: bool = True  # false: no drafts for this request on a server with --speculative-config
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured-output fields, also on chat
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def output_constraints(self) -> list[tuple[str, str, object]]:
        """The vLLM structured-output fields given, each as (kind, field name, value)."""
        given = [(kind, f"guided_{kind}", getattr(self, f"guided_{kind}")) for kind in GUIDED_KINDS]
        given = [constraint for constraint in given if constraint[2] is not None]
        return given + (self.structured_outputs.constraints() if self.structured_outputs else [])

    @model_validator(mode="after")
    def one_output_constraint(self) -> SamplingRequest:
        given = [name for _, name, _ in self.output_constraints()]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"only one of {', '.join(given)} can shape the output")
        return self

    @field_validator("top_k")
    @classmethod
    def top_k_off_or_positive(cls, top_k: int) -> int:
        if top_k == 0 or top_k < -1:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return top_k

    @field_validator("logit_bias")
    @classmethod
    def biases_in_range(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        if bias and any(not -100 <= value <= 100 for value in bias.values()):
            raise ValueError("each logit_bias value must lie in [-100, 100]")
        return bias

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        return stop

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def top_logprob_count(self) -> int | None:
        """How many alternatives to report per token; None when logprobs are not wanted."""
        return None

    # the field that asks for alternatives, and OpenAI's limit on it (the server's --max-logprobs replaces it)
    LOGPROBS_FIELD: ClassVar[str] = "top_logprobs"
    OPENAI_MAX_LOGPROBS: ClassVar[int] = 20


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    parallel_tool_calls: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: TemplateVariables = None
    r1_settings: R1Settings | None = None

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @field_validator("tools")
    @classmethod
    def unique_tool_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tool names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def tool_choice_names_a_tool(cls, choice, info: ValidationInfo):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if choice in (None, "none", "auto"):
            return choice
        if not names:
            raise ValueError("tool_choice other than 'none' or 'auto' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"it names {choice.function.name!r}, which is not among the tools")
        shape = info.data.get("response_format")
        if shape is not None and shape.type != "text":
            raise ValueError("a forced tool_choice and a JSON response_format cannot both shape the reply")
        return choice

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools one of which the reply must call (tool_choice required or named); empty if none must."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == self.tool_choice.function.name]
        return []

    @property
    def callable_tools(self) -> list[Tool]:
        """The tools the model is shown and may call."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def no_empty_prompt_lists(cls, prompt):
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise ValueError("token prompts must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise not_supported("suffix (insertion)")
        return suffix

    @model_validator(mode="after")
    def best_of_covers_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of greater than n cannot be streamed")
        return self

    LOGPROBS_FIELD: ClassVar[str] = "logprobs"
    OPENAI_MAX_LOGPROBS: ClassVar[int] = 5

    @property
    def candidates(self) -> int:
        return self.best_of or self.n

    @property
    def top_logprob_count(self) -> int | None:
        return self.logprobs


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def drop_none(handler, model: BaseModel, keys: tuple[str, ...]) -> dict:
    return {key: value for key, value in handler(model).items() if value is not None or key not in keys}


def with_reasoning(body: dict) -> dict:
    """reasoning_content again as `reasoning`, vLLM's newer name, so clients of either spelling find it."""
    if "reasoning_content" in body:
        body["reasoning"] = body["reasoning_content"]
    return body


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def omit_unset(self, handler) -> dict:
        return with_reasoning(drop_none(handler, self, ("reasoning_content", "tool_calls")))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str = ""

    @model_serializer(mode="wrap")
    def omit_unset(self, handler) -> dict:
        return drop_none(handler, self, ("name",))


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: its id, type and name come first, then argument fragments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def omit_unset(self, handler) -> dict:
        return drop_none(handler, self, ("id", "type"))


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def omit_unset(self, handler) -> dict:
        return with_reasoning(drop_none(handler, self, ("role", "content", "reasoning_content", "tool_calls")))


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "batchwise"
    max_model_len: int | None = None  # vLLM's: the most tokens one sequence holds
    root: str | None = None  # vLLM's: a LoRA adapter's folder
    parent: str | None = None  # vLLM's: a LoRA adapter's base model


# vLLM's tokenizer endpoints and /version.

class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (a prompt) or TokenizeChatRequest (messages, rendered as chat completions
    render them), in one schema."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    chat_template_kwargs: TemplateVariables = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # unset: true for a prompt; for messages false, the template writes them
    return_token_strs: bool = False

    @model_validator(mode="after")
    def prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        asked = self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set
        if asked and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None

    @model_serializer(mode="wrap")
    def omit_unset(self, handler) -> dict:
        return drop_none(handler, self, ("token_strs",))


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionInfo(BaseModel):
    version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# The audio endpoints: the transcription form's fields, and the JSON and stream events sent back.

TranscriptFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class TranscriptionForm(BaseModel):
    """The multipart fields besides the file; fields this server does not use are accepted and ignored."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: TranscriptFormat = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment", "word"]] = Field(default_factory=list,
                                                                      alias="timestamp_granularities[]")
    stream: bool = False
    vad_filter: bool = True  # faster-whisper's and speaches' name: skip silence before decoding

    @field_validator("language", "prompt")
    @classmethod
    def blank_is_absent(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int  # where the segment's window starts, in 10 ms mel frames
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class Transcription(BaseModel):
    text: str
    usage: DurationUsage


class VerboseTranscription(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord] | None = None  # with timestamp_granularities[]=word
    usage: DurationUsage


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str


# The Responses API: input items, flat function tools and text.format in; a response object and typed
# stream events out.

class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str  # a data: or http(s) URL (this server keeps no uploaded files to name by file_id)
    detail: Literal["auto", "low", "high"] = "auto"


class InputMessage(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, InputText))

    def chat_content(self) -> str | list[ContentPart]:
        """As a chat message's content: its text, or with images its parts in order."""
        if isinstance(self.content, str) or not any(isinstance(part, InputImage) for part in self.content):
            return self.text()
        return [ImagePart(type="image_url", image_url=ImageURL(url=part.image_url, detail=part.detail))
                if isinstance(part, InputImage) else TextPart(type="text", text=part.text) for part in self.content]


class FunctionCallInput(BaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputInput(BaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningInput(BaseModel):
    """An earlier reply's reasoning, sent back by clients that replay whole turns; the prompt leaves it out."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["reasoning"]


InputItem = Annotated[InputMessage | FunctionCallInput | FunctionCallOutputInput | ReasoningInput,
                      Field(discriminator="type")]


class FunctionTool(FunctionDefinition):
    """The Responses API's flat tool: a function definition with its type beside it."""
    type: Literal["function"]


class NamedFunction(ToolName):
    type: Literal["function"]


class TextFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    json_schema: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("text.format of type json_schema needs a schema")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    parallel_tool_calls: bool = True
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def not_empty(cls, items):
        if not items:
            raise ValueError("input must not be empty")
        return items

    @field_validator("input", mode="before")
    @classmethod
    def messages_without_a_type(cls, items):
        """A bare {"role", "content"} is a message (the SDKs' easy input form)."""
        if isinstance(items, list):
            return [{"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
                    for item in items]
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def function_tools_only(cls, tools):
        for tool in tools or []:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"built-in tool {kind!r} is not supported by this server: only function tools are")
        return tools

    @field_validator("background")
    @classmethod
    def no_background(cls, background: bool) -> bool:
        if background:
            raise not_supported("background")
        return background


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str = Field(default_factory=lambda: new_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class OutputFunctionCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("fc"))
    type: Literal["function_call"] = "function_call"
    status: ItemStatus = "in_progress"
    call_id: str
    name: str
    arguments: str = ""


class OutputReasoning(BaseModel):
    id: str = Field(default_factory=lambda: new_id("rs"))
    type: Literal["reasoning"] = "reasoning"
    status: ItemStatus = "in_progress"
    summary: list = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=now)
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: ErrorBody | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | NamedFunction = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    text: TextConfig = Field(default_factory=TextConfig)
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = True
    user: str | None = None


class ResponseEvent(BaseModel):
    """One typed stream event; its other fields (response, item, delta, ...) vary with its type."""
    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# vLLM's runtime LoRA endpoints.

class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; adapters are named here


# OpenAI's /v1/embeddings.

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request


def embedding_input_shape(value: object) -> object:
    """A text, a list of texts, a list of token ids, or a list of lists of token ids; none of them empty."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        items = value
    elif isinstance(value, list) and value and all(type(item) is int for item in value):
        items = [value]
    elif (isinstance(value, list) and value
          and all(isinstance(item, list) and all(type(i) is int for i in item) for item in value)):
        items = value
    elif value == []:
        raise ValueError("the input is empty")
    else:
        raise ValueError("expected a string, a list of strings, a list of token ids or a list of lists of token ids")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}")
    empty = next((index for index, item in enumerate(items) if len(item) == 0), None)
    if empty is not None:
        raise ValueError(f"input {empty} is empty" if len(items) > 1 else "the input is empty")
    return value


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    _input_shape = field_validator("input", mode="before")(embedding_input_shape)

    @property
    def inputs(self) -> list[str] | list[list[int]]:
        """Every input as a list: texts, or token ids."""
        if isinstance(self.input, str):
            return [self.input]
        return [self.input] if isinstance(self.input[0], int) else self.input


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the float32 values' little-endian bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# /rerank and /v1/rerank: Jina's and Cohere's shape, as vLLM serves it.

class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    query: str = Field(min_length=1)
    documents: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    top_n: int | None = Field(default=None, ge=0)  # unset or 0: every document
    return_documents: bool = True
    user: str | None = None


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None

    @model_serializer(mode="wrap")
    def without_missing_document(self, handler) -> dict:
        return drop_none(handler, self, ("document",))


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
