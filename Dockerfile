# asgigramd container image.
#
#   docker build -t asgigramd .
#   docker run --rm -e ASGIGRAM_TELEGRAM__TOKEN=... \
#       -v "$PWD/mybot:/app:ro" -v "$PWD/asgigram.toml:/etc/asgigram/asgigram.toml:ro" \
#       -v asgigram-state:/var/lib/asgigram asgigramd
#
# The image runs the example echo bot (examples/echo.py) when no config is
# mounted. Python packages your app needs: build FROM this image and
# `pip install` them as root, or mount a virtualenv and set app.python.
# docs/deployment.md has docker run, compose and Kubernetes examples.
#
# Token: ASGIGRAM_TELEGRAM__TOKEN, or a secret file named by
# ASGIGRAM_TELEGRAM__TOKEN_FILE (e.g. /run/secrets/telegram_token).
# State (the update journal): the volume /var/lib/asgigram.
# Operations endpoint: on by default in the image, 0.0.0.0:8080 (/healthz,
# /readyz, /metrics); ASGIGRAM_HTTP__BIND= (empty) turns it off, and the
# HEALTHCHECK with it.

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them. Cargo checks every
# target the manifest names, so the benches get stubs too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
    && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && for b in throughput sender; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked \
    && rm -rf src benches
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin asgigramd

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin asgigram \
    && mkdir -p /etc/asgigram /app /var/lib/asgigram \
    && chown asgigram /var/lib/asgigram
COPY --from=build /src/target/release/asgigramd /usr/local/bin/asgigramd
# The example bot and its config, as a working default.
COPY examples/echo.py /app/echo.py
COPY config/asgigram.toml /etc/asgigram/asgigram.toml
ENV ASGIGRAM_APP__APP_DIR=/app \
    ASGIGRAM_JOURNAL__DIR=/var/lib/asgigram \
    ASGIGRAM_HTTP__BIND=0.0.0.0:8080 \
    PYTHONUNBUFFERED=1
WORKDIR /app
VOLUME ["/var/lib/asgigram"]
# 8080: the operations endpoint (http.bind); 8443: webhook mode (webhook.listen).
EXPOSE 8080 8443
USER asgigram
# Liveness against /healthz on the port of ASGIGRAM_HTTP__BIND; passes when
# the endpoint is switched off (empty bind). No curl in the image: python3's
# urllib does the request, and any failure (refused, timeout, non-2xx) raises
# and exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request\nbind = os.environ.get('ASGIGRAM_HTTP__BIND', '')\nif bind:\n    urllib.request.urlopen('http://127.0.0.1:%s/healthz' % bind.rsplit(':', 1)[1], timeout=4)"]
# tini forwards SIGTERM and SIGHUP to asgigramd and reaps worker processes.
ENTRYPOINT ["/usr/bin/tini", "--", "asgigramd"]
CMD ["--config", "/etc/asgigram/asgigram.toml"]
