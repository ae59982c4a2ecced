"""vLLM's /tokenize and /detokenize on the chat path: a prompt tokenized as /v1/completions tokenizes it, or
messages rendered and tokenized as /v1/chat/completions does (the ids it would prefill), and ids back to text."""

from __future__ import annotations

from models import ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serving.chat import chat_prompt
from serving.template import PromptEnding
from serving.text_service import TextService


async def tokenize(service: TextService, request: TokenizeRequest) -> TokenizeResponse:
    service.check_model(request.model or service.model_name)
    if request.messages is None:
        ids = service.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens is not False).input_ids
    else:
        ending = PromptEnding(request.add_generation_prompt and not request.continue_final_message,
                              request.continue_final_message, bool(request.add_special_tokens))
        chat = ChatCompletionRequest(model=service.model_name, messages=request.messages, tools=request.tools,
                                     chat_template_kwargs=request.chat_template_kwargs)
        ids = (await chat_prompt(service, chat, ending))[0].ids
    strings = service.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=service.context_length, tokens=ids, token_strs=strings)


def detokenize(service: TextService, request: DetokenizeRequest) -> DetokenizeResponse:
    service.check_model(request.model or service.model_name)
    service.check_token_ids(request.tokens, "tokens")
    return DetokenizeResponse(prompt=service.tokenizer.decode(request.tokens))
