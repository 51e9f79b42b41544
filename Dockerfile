# syntax=docker/dockerfile:1
# kubeprism container image: a wheel built in one stage, installed alone in a slim runtime.
#   docker build -t kubeprism:0.1.0 .
#   docker run --network host -v /etc/kubeprism:/etc/kubeprism:ro kubeprism:0.1.0
# As a static pod on every node: deploy/kubernetes/static-pod.yaml.

FROM python:3.11-slim AS builder
# A C compiler for the compiled forwarding engine (setup.py, mypyc); the image has the
# Python headers. Only this stage has it: the runtime image gets the built wheel.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the wheel is built from (see .dockerignore): tests and benches stay out.
COPY pyproject.toml setup.py README.md ./
COPY kubeprism ./kubeprism
# The wheel's data files (share/): the operations guide, the example config, the units.
COPY docs/operations.md ./docs/
COPY deploy/kubeprism.yaml ./deploy/
COPY deploy/systemd ./deploy/systemd
# kubeprism and every dependency as wheels (the dependencies publish binary wheels for
# linux x86_64 and aarch64; kubeprism's own wheel carries the compiled engine).
# KUBEPRISM_NATIVE=1: an image without the compiled engine is a failed build, not a slower one.
RUN KUBEPRISM_NATIVE=1 pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# A fixed, unprivileged uid: the static pod runs as 10001 and the node's
# /var/lib/kubeprism is owned by it.
RUN groupadd --system --gid 10001 kubeprism \
    && useradd --system --uid 10001 --gid kubeprism --no-create-home \
       --home-dir /var/lib/kubeprism --shell /usr/sbin/nologin kubeprism
# Install from the builder's wheels only (no index), then drop the installers: nothing in
# the final image can build or fetch code.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/kubeprism-*.whl \
    && pip uninstall --yes pip setuptools wheel
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 7445 client listener, 7446 admin (/metrics /healthz /readyz /upstreams); with
# hostNetwork both are on the node's loopback.
EXPOSE 7445 7446
ENTRYPOINT ["kubeprism"]
CMD ["run", "--config", "/etc/kubeprism/kubeprism.yaml"]
