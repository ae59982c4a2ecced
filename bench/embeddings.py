"""Embedding throughput: texts embedded per second by `--serving-type embedding` (the built-in all-MiniLM-L6-v2)
with 1 and 32 concurrent clients (one text per request, through the openai SDK), against sentence-transformers'
`encode(batch_size=32)` on the same folder and dtype, run in this process after the server stops (both are
CPU-bound).

    python -m bench.embeddings
    python -m bench.embeddings --texts 512 --dtype float32
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import time
from pathlib import Path

import numpy as np
import openai
import torch
from sentence_transformers import SentenceTransformer

from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, cpu_model, process_env
from config import Config, auto_dtype, cpu_flags
from converters.embedded_embedder import EMBEDDED_EMBEDDING_NAME, embedded_embedder_folder
from tests.helpers.server_process import running_server

BATCH = 32
LEVELS = (1, 32)
WORDS = ("the model server batches requests of many clients into one forward so that each text costs less time "
         "while the queue stays bounded and vectors match the reference library to the last few bits").split()


def sample_texts(count: int, seed: int = 0) -> list[str]:
    """Sentences of 4 to 60 words, as a search index's passages and queries mix."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60))).capitalize() + "." for _ in range(count)]


async def server_rate(url: str, texts: list[str], clients: int) -> tuple[float, list[list[float]]]:
    """Texts per second with `clients` clients each sending one text per request; the vectors in order."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    vectors: list = [None] * len(texts)
    indices = iter(range(len(texts)))  # shared: each client takes the next text when its last one is back

    async def worker() -> None:
        for index in indices:
            response = await client.embeddings.create(model=EMBEDDED_EMBEDDING_NAME, input=texts[index])
            vectors[index] = response.data[0].embedding

    # warm-up: a forward of each size the run will see
    await asyncio.gather(*(client.embeddings.create(model=EMBEDDED_EMBEDDING_NAME, input=text)
                           for text in texts[:clients]))
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(texts) / (time.perf_counter() - started), vectors


def reference_rate(folder: Path, texts: list[str], dtype: str) -> tuple[float, np.ndarray]:
    model = SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
    model.encode(texts[:BATCH], batch_size=BATCH)
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=BATCH, convert_to_tensor=True).float().numpy()
    return len(texts) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    dtype = auto_dtype("cpu", cpu_flags())[0] if args.dtype == "auto" else args.dtype
    texts = sample_texts(args.texts)
    rates: dict[str, float] = {}
    with running_server("--serving-type", "embedding", "--torch-dtype", dtype, "--continuous-batching-batch-size",
                        str(BATCH), env=process_env(DEFAULT_MKL_CBWR)) as url:
        for clients in LEVELS:
            rates[f"server, {clients} client{'s' if clients > 1 else ''}"], served = asyncio.run(
                server_rate(url, texts, clients))
    reference, expected = reference_rate(embedded_embedder_folder(Path(Config().model_cache_dir)), texts, dtype)
    rates[f"sentence-transformers encode(batch_size={BATCH})"] = reference
    worst = float(((np.array(served) * expected).sum(1)).min())  # both unit length
    lines = [f"# Embeddings ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; {EMBEDDED_EMBEDDING_NAME} in {dtype}; {len(texts)} texts of "
             f"4-60 words; server batch {BATCH}; lowest cosine server vs sentence-transformers {worst:.6f}", "",
             "| configuration | texts/s | vs sentence-transformers |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.1f} | {rate / reference:.2f}x |" for name, rate in rates.items()]
    report = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embeddings-latest.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
