# The serving image for the Helm chart: Ray's own CUDA + Python image at the Ray version nibble
# pins, plus nibble. Ray's image runs as the non-root user `ray` (uid 1000).
#   docker build -t ghcr.io/nibble-llm/nibble:0.1.0 .
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cu128

WORKDIR /home/ray/nibble
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 engine engine
COPY --chown=1000:100 workers workers
COPY --chown=1000:100 deployments deployments
COPY --chown=1000:100 configs configs
COPY --chown=1000:100 benchmarks/demo_model/model benchmarks/demo_model/model
# torch resolves to its CUDA build here (the CPU pin is only for CI and laptops).
RUN pip install --no-cache-dir . && python -c "import engine, workers, deployments"
USER 1000
EXPOSE 8000 8080
