# asgigramd container image.
#
#   docker build -t asgigramd .
#   docker run --rm -e ASGIGRAM_TELEGRAM__TOKEN=... \
#       -v "$PWD/mybot:/app:ro" -v "$PWD/asgigram.toml:/etc/asgigram/asgigram.toml:ro" asgigramd
#
# The image runs the example echo bot (config/echo.py) when no config is
# mounted. Python packages your app needs: build FROM this image and
# `pip install` them as root, or mount a virtualenv and set app.python.

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
COPY config ./config
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
COPY config/echo.py /app/echo.py
COPY config/asgigram.toml /etc/asgigram/asgigram.toml
ENV ASGIGRAM_APP__APP_DIR=/app \
    PYTHONUNBUFFERED=1
WORKDIR /app
VOLUME ["/var/lib/asgigram"]
USER asgigram
# tini forwards SIGTERM to asgigramd and reaps worker processes.
ENTRYPOINT ["/usr/bin/tini", "--", "asgigramd"]
CMD ["--config", "/etc/asgigram/asgigram.toml"]
