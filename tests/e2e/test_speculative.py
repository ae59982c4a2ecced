"""The real server with --speculative-config: a streamed chat completion through the openai SDK reads as the same
request answered whole, /metrics counts the drafts, and a request that opts out drafts nothing."""

import json

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server_process import running_server

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'


def test_a_streamed_chat_with_drafts_reads_as_the_whole_answer(embedded_model_dir):
    with running_server("--speculative-config", NGRAM) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        request = dict(model=model, max_tokens=48, temperature=0, messages=[
            {"role": "user", "content": "Repeat after me three times: the cat sat on the mat."}])
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(stream=True, **request) if chunk.choices)
        whole = client.chat.completions.create(**request)
        metrics = scrape(url)
        opted_out = client.chat.completions.create(**request, extra_body={"speculative": False})
        drafts_after = scrape(url)["batchwise_spec_decode_draft_tokens_total"]
    assert streamed == whole.choices[0].message.content and streamed
    assert metrics["batchwise_spec_decode_accepted_tokens_total"] > 0
    assert metrics["batchwise_spec_decode_draft_tokens_total"] >= metrics["batchwise_spec_decode_accepted_tokens_total"]
    for ours, vllms in [("draft_tokens", "num_draft_tokens"), ("accepted_tokens", "num_accepted_tokens"),
                        ("verification_steps", "num_drafts")]:
        assert metrics[f"vllm:spec_decode_{vllms}_total"] == metrics[f"batchwise_spec_decode_{ours}_total"]
    assert opted_out.choices[0].message.content == streamed
    assert drafts_after == metrics["batchwise_spec_decode_draft_tokens_total"]


def scrape(url: str) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for sample in family.samples}


def test_a_draft_model_drafts_for_the_server(embedded_model_dir):
    """The embedded model as its own draft model: every draft is accepted, and the answer is the one without (in
    float32: the draft runs transformers' attention, the target the engine's, and bfloat16 near-ties could part)."""
    draft = json.dumps({"method": "draft_model", "model": str(embedded_model_dir), "num_speculative_tokens": 3})
    request = dict(max_tokens=24, temperature=0, messages=[{"role": "user", "content": "Name three rivers."}])
    with running_server("--speculative-config", draft, "--torch-dtype", "float32") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        model = client.models.list().data[0].id
        drafted = client.chat.completions.create(model=model, **request).choices[0].message.content
        plain = client.chat.completions.create(model=model, extra_body={"speculative": False}, **request)
        metrics = scrape(url)
    assert drafted == plain.choices[0].message.content
    assert metrics["batchwise_spec_decode_accepted_tokens_total"] == metrics["batchwise_spec_decode_draft_tokens_total"]
    assert metrics["batchwise_spec_decode_draft_tokens_total"] > 0
