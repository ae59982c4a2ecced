"""/metrics after real requests: counters and histograms move by exactly what the requests did (parsed
with prometheus_client's own parser)."""

import asyncio
import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from config import Config
from tests.helpers.server_process import ROOT


def scrape(base_url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{base_url}/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, sample_labels), v in samples.items()
               if n == name and all((k, str(w)) in sample_labels for k, w in labels.items()))


def test_counters_and_histograms_move_by_what_requests_did(base_url, client):
    model = client.models.list().data[0].id
    before = scrape(base_url)
    replies = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Count to {i}"}],
                                              max_tokens=6 + i, temperature=0) for i in range(3)]
    streamed = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, stream=True,
                                              stream_options={"include_usage": True}))
    with pytest.raises(Exception):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    after = scrape(base_url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    usages = [r.usage for r in replies] + [streamed[-1].usage]
    completion = sum(u.completion_tokens for u in usages)
    assert moved("batchwise_requests_total", endpoint="/v1/chat/completions", status=200) == 3
    assert moved("batchwise_requests_total", endpoint="/v1/completions", status=200) == 1
    assert moved("batchwise_requests_total", endpoint="/v1/chat/completions", status=400) == 1
    assert moved("batchwise_generation_tokens_total", model=model) == completion
    assert moved("batchwise_prompt_tokens_total", model=model) == sum(u.prompt_tokens for u in usages)
    assert moved("batchwise_time_to_first_token_seconds_count") == 4
    assert moved("batchwise_request_latency_seconds_count") == 4
    assert moved("batchwise_inter_token_latency_seconds_count") == completion - 4
    assert moved("batchwise_engine_step_seconds_count") >= max(u.completion_tokens for u in usages)
    assert value(after, "batchwise_sequences_running", model=model) >= 0
    assert 0 < value(after, "batchwise_kv_tokens_used") <= value(after, "batchwise_kv_tokens_budget")
    # the same measures under vLLM's names and labels, for dashboards, autoscalers and gateways made for vLLM
    for ours, vllms in VLLM_TWINS.items():
        assert moved(vllms, model_name=model, engine=0) == moved(ours, model=model), vllms
    assert moved("vllm:prefix_cache_queries_total", model_name=model) == moved("batchwise_prompt_tokens_total")
    assert moved("vllm:request_success_total", model_name=model, finished_reason="length") == 4
    assert moved("vllm:request_prompt_tokens_count", model_name=model) == 4
    assert moved("vllm:request_generation_tokens_sum", model_name=model) == completion
    kv_usage = value(after, "vllm:kv_cache_usage_perc", model_name=model, engine=0)
    assert kv_usage == value(after, "batchwise_kv_tokens_used") / value(after, "batchwise_kv_tokens_budget")


# what vLLM's Grafana dashboard, KEDA's examples and the Gateway API inference extension read
VLLM_TWINS = {
    "batchwise_prompt_tokens_total": "vllm:prompt_tokens_total",
    "batchwise_generation_tokens_total": "vllm:generation_tokens_total",
    "batchwise_prefix_cache_hit_tokens_total": "vllm:prefix_cache_hits_total",
    "batchwise_time_to_first_token_seconds_count": "vllm:time_to_first_token_seconds_count",
    "batchwise_time_to_first_token_seconds_bucket": "vllm:time_to_first_token_seconds_bucket",
    "batchwise_inter_token_latency_seconds_sum": "vllm:inter_token_latency_seconds_sum",
    "batchwise_request_latency_seconds_count": "vllm:e2e_request_latency_seconds_count",
    "batchwise_sequences_running": "vllm:num_requests_running",
    "batchwise_sequences_waiting": "vllm:num_requests_waiting",
}


def test_the_grafana_dashboard_queries_only_what_the_server_exports(base_url):
    exported = set()
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        exported |= {family.name + suffix for suffix in suffixes}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "batchwise.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"batchwise_\w+", target["expr"])}
    assert queried and queried <= exported, queried - exported


@pytest.mark.parametrize("public", [False, True])
def test_metrics_sit_behind_the_api_key_unless_public(public):
    """The app itself, without starting its model: /metrics answers before the model is up."""
    app = create_app(Config(api_key="secret", metrics_public=public))
    transport = httpx.ASGITransport(app=app)

    async def get(headers):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return (await http.get("/metrics", headers=headers)).status_code

    assert asyncio.run(get({})) == (200 if public else 401)
    assert asyncio.run(get({"Authorization": "Bearer secret"})) == 200
