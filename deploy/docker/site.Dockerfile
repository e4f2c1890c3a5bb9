# fedrelapse hospital site: SuperNode + the installed ClientApp (no code is ever downloaded).
#   docker build -f deploy/docker/site.Dockerfile -t fedrelapse-site .
# The image holds code only: the root .dockerignore keeps keys and site data out of the build context;
# they are mounted at run time (below).
FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 FLWR_TELEMETRY_ENABLED=0
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 fedrelapse
WORKDIR /opt/fedrelapse
COPY deploy/requirements.lock deploy/requirements.lock
# The site image never contains the GPL espeak-ng extra (synthetic data is made elsewhere).
RUN grep -v '^espeakng-loader==' deploy/requirements.lock > /tmp/req.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple -r /tmp/req.txt
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY shared shared
COPY configs configs
COPY deploy/torchaudio_compat.py deploy/torchaudio_compat.py
RUN pip install --no-deps . && python deploy/torchaudio_compat.py
USER fedrelapse
# Mounted: /site/site.yaml (+ manifest and recordings, read-only), /site/state (ledger, keys, cache,
# the pinned flwr-clientapp launcher; read-write), /consortium/ca.pem and this site's /consortium/node.key (read-only).
EXPOSE 9094
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health', timeout=4)"
ENTRYPOINT ["fedrelapse", "site", "start", "--site", "/site/site.yaml", "--ca", "/consortium/ca.pem", "--node-key", "/consortium/node.key", "--port", "9094"]
CMD ["--superlink", "coordinator:9092"]
