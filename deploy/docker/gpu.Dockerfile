# dmoe-gpu image: every binary built with the CUDA kernels (--config=cuda: sm_90 and sm_80, PTX for
# newer GPUs), for `dmoe-attention --device cuda` and `dmoe-expert --device cuda` (the gpu-rdma
# overlay of deploy/k8s). Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile --build-arg DMOE_COMMIT=$(git rev-parse HEAD) -t dmoe-gpu .
# Run with the NVIDIA container toolkit (it mounts the driver, CUDA 13 needs >= 580).
#
# Everything but CUDA comes from Debian 12's apt, as in the CPU image (deploy/docker/Dockerfile);
# CUDA 13 (nvcc, cudart, cuBLAS) comes from NVIDIA's Debian 12 repository. NVIDIA's own CUDA base
# images are Ubuntu / RHEL based, whose gRPC, Abseil and UCX versions differ from the stack dmoe is
# built and tested with, hence debian:12 plus NVIDIA's packages rather than nvidia/cuda.
# UCX is Debian's (no CUDA transports): dmoe hands UCX page-locked host buffers, not device
# memory, so none are needed (dmoe-attention logs the path).
FROM debian:12 AS build
ARG CUDA_PKG=13-0
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && curl -fsSL -o /tmp/cuda-keyring.deb \
      https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
 && apt-get update && apt-get install -y --no-install-recommends \
      cuda-nvcc-${CUDA_PKG} cuda-cudart-dev-${CUDA_PKG} libcublas-dev-${CUDA_PKG} \
      bazel-bootstrap g++ libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev libucx-dev prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev \
      libopenblas-dev libpcre2-dev nlohmann-json3-dev libspdlog-dev libboost1.74-dev libssl-dev \
      pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG DMOE_COMMIT=""
RUN cuda=$(ls -d /usr/local/cuda-* | sort -V | tail -1) \
 && DMOE_COMMIT="$DMOE_COMMIT" bazel build -c opt --stamp --config=cuda --repo_env=DMOE_CUDA_PATH="$cuda" \
      //cli:dmoe //expert_service:dmoe-expert //attention_service:dmoe-attention \
      //gateway:dmoe-gateway //router:dmoe-router \
 && mkdir -p /out && cp bazel-bin/cli/dmoe bazel-bin/expert_service/dmoe-expert bazel-bin/router/dmoe-router \
      bazel-bin/attention_service/dmoe-attention bazel-bin/gateway/dmoe-gateway /out/ \
 && mkdir -p /out/lib && cp -L $(find bazel-bin/ -name '*.so' -path '*_solib_k8*') /out/lib/ \
 && bazel shutdown

FROM debian:12
ARG CUDA_PKG=13-0
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && curl -fsSL -o /tmp/cuda-keyring.deb \
      https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
 && dpkg -i /tmp/cuda-keyring.deb && rm /tmp/cuda-keyring.deb \
 && apt-get update && apt-get install -y --no-install-recommends \
      cuda-cudart-${CUDA_PKG} libcublas-${CUDA_PKG} \
      libgrpc++1.51 libprotobuf32 libabsl20220623 libucx0 ucx-utils libprometheus-cpp-core1.0 \
      libprometheus-cpp-pull1.0 libopenblas0-pthread libpcre2-8-0 libspdlog1.10 libfmt9 libssl3 \
 && apt-get purge -y curl && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
 && ls -d /usr/local/cuda-*/targets/x86_64-linux/lib > /etc/ld.so.conf.d/dmoe-cuda.conf && ldconfig \
 && useradd --system --uid 10001 --home-dir /nonexistent dmoe
COPY --from=build /out/dmoe /out/dmoe-router /out/dmoe-expert /out/dmoe-attention /out/dmoe-gateway \
     /usr/local/bin/
COPY --from=build /out/lib/ /usr/local/lib/dmoe/
COPY --from=build /src/deploy/chat_templates/*.jinja /usr/local/share/dmoe/chat_templates/
# The binaries find cudart / cuBLAS through ld.so.conf (above) or their rpath to the build
# stage's toolkit (/usr/local/cuda-13.x/lib64).
ENV LD_LIBRARY_PATH=/usr/local/lib/dmoe UCX_WARN_UNUSED_ENV_VARS=n \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
ENTRYPOINT []
CMD ["dmoe", "--help"]
