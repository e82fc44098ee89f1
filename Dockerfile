# One image for every qkdgw component; the compose `command` picks the component:
#   qgw pki init ..., qgw kme serve --config ..., qgw keys ..., qgw gateway ...
# and `python -m apps.<name>` (entrypoint override) for the demo endpoints.
#
#   docker build -t qkdgw:local .
#   docker run --rm qkdgw:local --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (there is no .dockerignore: never COPY . so the
# host's .venv, .git and state folders stay out of the image).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qgw ./qgw
COPY kme ./kme
COPY keyclient ./keyclient
COPY gateways ./gateways
COPY apps ./apps
# The ledger extra: web3, py-evm and paho-mqtt for `qgw gateway ledger` and apps.sensors;
# the webrtc extra: aiortc (with PyAV's wheels) for `qgw gateway webrtc`.
RUN pip install ".[fast,ledger,webrtc]" && cd / && rm -rf /src

# Non-root. /state is where the compose named volume is mounted; a fresh named volume
# takes the ownership of the image folder, so the PKI and stores are written as qgw.
RUN groupadd --system --gid 10001 qgw \
    && useradd --system --uid 10001 --gid qgw --home-dir /state --no-create-home \
       --shell /usr/sbin/nologin qgw \
    && mkdir -p /state /etc/qgw \
    && chown qgw:qgw /state
USER qgw:qgw
WORKDIR /state

# ETSI GS QKD 014 (HTTPS, mutual TLS) and Prometheus metrics + /health of a KME.
EXPOSE 8443 9443

ENTRYPOINT ["qgw"]
CMD ["--help"]
