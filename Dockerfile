# softserve on NVIDIA GPUs: CUDA runtime, CUDA build of torch, int8 via bitsandbytes.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data \
    MODEL_CACHE_DIR=/models \
    HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CUDA wheel of torch first, so the project's `torch>=2.4` is already satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY bench ./bench
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install .

# Convert the bundled default model at build time so containers start fast.
RUN python -m app.cli prepare-model

EXPOSE 8000
# Listening beyond localhost, the API refuses to start until an admin key exists:
#   docker compose run --rm api python -m app.cli create-key --role admin
# The default shape: one node serves and trains on one model copy (`python -m worker.node train`
# for a training-only node, `python -m app.cli api` for an API that does not train).
CMD ["python", "-m", "worker.node", "serve"]
