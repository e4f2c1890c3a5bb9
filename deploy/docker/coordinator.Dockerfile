# fedrelapse coordinator: SuperLink + ServerApp (TLS). Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedrelapse-coordinator .
FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 FLWR_TELEMETRY_ENABLED=0
RUN useradd --create-home --uid 10001 fedrelapse
WORKDIR /opt/fedrelapse
COPY deploy/requirements.lock deploy/requirements.lock
RUN grep -v '^espeakng-loader==' deploy/requirements.lock > /tmp/req.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple -r /tmp/req.txt
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY shared shared
COPY configs configs
COPY deploy/flower-app deploy/flower-app
COPY deploy/torchaudio_compat.py deploy/torchaudio_compat.py
RUN pip install --no-deps . && python deploy/torchaudio_compat.py
USER fedrelapse
# No key is ever in the image (root .dockerignore). Mount read-only at /keys only what `server start`
# reads: keys/ca/ca.pem at /keys/ca/ca.pem and the coordinator's own keys/server/ folder at /keys/server
# (server.key, server.pem, model-signing.key). Never ca/ca.key (keep it offline) nor a site's node.key.
# SuperNode authentication is on (the default of `server start`): register each site's key from the host,
# `fedrelapse server register-site NAME --keys keys --superlink localhost:9092` (compose: register-sites).
EXPOSE 9092
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD python -c "import ssl,urllib.request; urllib.request.urlopen('https://localhost:9092/health', context=ssl.create_default_context(cafile='/keys/ca/ca.pem'), timeout=4)"
ENTRYPOINT ["fedrelapse", "server", "start", "--keys", "/keys", "--host", "0.0.0.0", "--port", "9092"]
