# The `standin` service of docker-compose.test.yml: the dispatcher stand-in
# (examples/dispatcher_standin.rs: OAuth2 login, refresh tokens, SSH keys
# API) with the worker's key registered at start. Build context: the repo.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /build
# The example builds the library and the dev-dependencies; the manifest
# needs its benches; the stand-in's code lives in tests/common/.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY tests/common ./tests/common
RUN cargo build --release --locked --example dispatcher_standin \
    && install -D -m 0755 target/release/examples/dispatcher_standin /out/dispatcher_standin

FROM ${BASE_IMAGE}
# socat: the stand-in listens on 127.0.0.1 only (see standin.sh).
# hadolint ignore=DL3008
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends socat \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/dispatcher_standin /usr/local/bin/dispatcher_standin
COPY tests/compose/standin.sh /usr/local/bin/standin.sh
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/standin.sh"]
