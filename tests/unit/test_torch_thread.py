"""All of the server's torch work runs on one thread (batching.torch_thread): a second thread running torch
brings a second OpenMP pool onto the same cores, and every forward after that ran about twice as slowly."""

import asyncio
import threading

from torch.nn.modules.module import register_module_forward_pre_hook

from batching.torch_thread import THREAD_NAME
from config import parse_config
from serving.text_service import start_chat_service
from serving.startup import StartupProgress
from tests.helpers.engine import finish, greedy
from tests.helpers.tiny_models import tiny_model


def test_the_chat_service_runs_every_forward_on_the_one_torch_thread(tokenizer, tmp_path):
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = parse_config(["--hf-model", str(tmp_path), "--static-cache", "true", "--continuous-batching-batch-size",
                           "2", "--static-cache-decoder-max-length", "64"])
    threads: list[str] = []

    async def serve_one_request() -> list[int]:
        service = await start_chat_service(config, StartupProgress())
        try:
            seq = service.engine.add(tokenizer("Hello there")["input_ids"], greedy(4))
            return (await finish(service.engine, seq)).output_ids
        finally:
            await service.engine.stop()

    hook = register_module_forward_pre_hook(lambda module, args: threads.append(threading.current_thread().name))
    try:
        assert len(asyncio.run(serve_one_request())) == 4
    finally:
        hook.remove()
    # the probe of the KV layout (building the engine), the warm-up of the static step, prefill and decode
    assert len(threads) > 4 and {name.rsplit("_", 1)[0] for name in threads} == {THREAD_NAME}
    assert len(set(threads)) == 1
