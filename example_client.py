"""Talk to a running Batchwise server with the official OpenAI Python SDK.

Start the server (`make run`, `.\\start.ps1` on Windows, or `docker compose up`), then:

    pip install openai            # already in .venv after `make run` (requirements.txt)
    python example_client.py
    python example_client.py --port 8000 --prompt "Write a haiku about queues."

It prints one chat answer, the same question streamed token by token, a plain text completion, a reply
held to a JSON schema, and a tool call.
The key sent is $API_KEY (or "-"): the server checks keys only when started with --api-key.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai
from openai import OpenAI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="localhost", help="server address")
    parser.add_argument("--port", type=int, default=7088, help="server port")
    parser.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                        help="question for the chat calls")
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer")
    return parser.parse_args(argv)


def run(client: OpenAI, model: str | None, prompt: str, max_tokens: int) -> None:
    if model is None:
        model = client.models.list().data[0].id
    print(f"model: {model}\n")
    messages = [{"role": "user", "content": prompt}]

    print("== chat ==")
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    print(answer.choices[0].message.content)
    print(f"[finish_reason={answer.choices[0].finish_reason}, tokens: {answer.usage.prompt_tokens} prompt"
          f" + {answer.usage.completion_tokens} completion]\n")

    print("== chat, streamed ==")
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print("\n")

    print("== completion ==")
    text_prompt = "The three primary colours are"
    completion = client.completions.create(model=model, prompt=text_prompt, max_tokens=max_tokens, temperature=0)
    print(text_prompt + completion.choices[0].text + "\n")

    print("== JSON schema ==")
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                             "country": {"type": "string", "maxLength": 40}},
            "required": ["city", "country"], "additionalProperties": False}
    shaped = client.chat.completions.create(model=model, messages=messages, max_tokens=max(max_tokens, 64),
                                            temperature=0, response_format={"type": "json_schema", "json_schema": {
                                                "name": "city", "schema": city}})
    print(shaped.choices[0].message.content + "\n")

    print("== tool call ==")
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                "parameters": city}}
    called = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            tools=[weather], tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=max(max_tokens, 64), temperature=0)
    for call in called.choices[0].message.tool_calls or []:
        print(f"{call.function.name}({call.function.arguments})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base_url = f"http://{args.host}:{args.port}/v1"
    client = OpenAI(base_url=base_url, api_key=os.environ.get("API_KEY", "-"))
    try:
        run(client, args.model, args.prompt, args.max_tokens)
    except openai.APIConnectionError:
        print(f"Could not connect to {base_url}: is the server running? start it with `make run`",
              file=sys.stderr)
        return 1
    except openai.APIStatusError as error:
        if error.status_code == 503:
            print(f"The server at {base_url} is still loading the model: try again in a few seconds.",
                  file=sys.stderr)
        else:
            print(f"The server answered {error.status_code}: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
