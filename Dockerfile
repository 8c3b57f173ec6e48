# `pipeline` in a container: build, then a slim runtime with the binary alone.
#
#   docker build -t pipeline .
#   docker run --rm -p 8080:8080 -v ~/.cache/pipeline-models:/models:ro -v pipeline-cache:/cache \
#     pipeline serve experiments/retrieval.yaml --cell qwen2.5-coder-0.5b/knn-four-shot/loglik-fit \
#     --addr 0.0.0.0:8080
#
# No model is ever copied into an image: mount them at /models (found there by file name), or
# let `hf:` specs download them at start into the cache volume (pass HF_TOKEN at run time,
# never as a build argument). llama.cpp is compiled for TARGET_CPU; `native` means the build
# machine's CPU, so for a fleet pick the oldest CPU it runs on (e.g. x86-64-v3). The CPU
# features are part of every cache key.

ARG BUILD_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG TARGET_CPU=native
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --release --locked \
 && cp target/release/pipeline /usr/local/bin/pipeline

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libstdc++6 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/pipeline /usr/local/bin/pipeline
COPY experiments /app/experiments
COPY prompts /app/prompts
WORKDIR /app
ENV PIPELINE_MODELS_DIR=/models PIPELINE_CACHE_DIR=/cache PIPELINE_REPORTS_DIR=/reports
VOLUME ["/cache"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# SIGTERM (docker stop, Kubernetes) drains in-flight requests, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeline"]
CMD ["serve", "experiments/quickstart.yaml", "--cell", "qwen2.5-coder-0.5b/zero-shot/loglik", "--addr", "0.0.0.0:8080"]
