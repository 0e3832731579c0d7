# The zimfarm-worker image: the worker binary on Debian 12 (bookworm) slim.
#
#   docker build -t openzim/zimfarm-worker:latest .
#
# Run it as the original worker's README says (unchanged):
#
#   docker run \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       -v PATH_SSH_KEY:/usr/src/.ssh/id_rsa:ro \
#       -v PATH_WORKING_DIR:/zim_files \
#       --env USERNAME='username' --env PASSWORD='password' \
#       --env WORKING_DIR='PATH_WORKING_DIR' --env NODE_NAME='my_node_name' \
#       --env QUEUES='default' --env CONCURRENCY=2 \
#       --name=zimfarm_worker openzim/zimfarm-worker:latest
#
# WORKING_DIR is the working dir's path on the host and must be the source of
# the /zim_files bind mount: the worker mounts task dirs into the scraper
# containers by their host path.
#
# The image runs as root by default, because in that command the Docker
# socket (root:docker, 0660) and the mounted working dir are only reachable
# by root. It also has a user zimfarm (uid 1000, gid 1000) to run as instead:
#
#   chown -R 1000:1000 PATH_WORKING_DIR          # writable by uid 1000
#   chown 1000 PATH_SSH_KEY && chmod 600 PATH_SSH_KEY
#   docker run --user 1000:1000 \
#       --group-add "$(stat -c %g /var/run/docker.sock)" \
#       -v ... (same volumes and variables as above)
#
# --group-add gives the worker the socket's group (the host's "docker" group
# id, which no name in this image stands for). Note that access to the
# Docker socket is root-equivalent on the host whichever user runs the
# worker; running as uid 1000 protects against mistakes inside the worker's
# own container, not against the socket. scripts/image-test.sh runs the image
# both ways (IMAGE_TEST_USER=1000:1000 for this one).
#
# The warehouse's SSH host key: the worker refuses unknown host keys (no
# trust on first use). This build runs ssh-keyscan against WAREHOUSE_KEYSCAN
# (space-separated host:port entries) and installs, as
# /usr/src/.ssh/known_hosts (the default WAREHOUSE_KNOWN_HOSTS), only the
# keys whose SHA256 fingerprint is pinned for that host:port in
# scripts/warehouse-host-keys.pin or in the WAREHOUSE_KEYSCAN_PINS build arg
# ("host:port SHA256:...", ',' between entries). The build fails when a
# keyscan returns no key or no pinned one (scripts/pin-host-keys.sh; its
# test is scripts/pin-host-keys-test.sh). `--build-arg WAREHOUSE_KEYSCAN=`
# (empty) skips it and leaves an empty known_hosts: set
# WAREHOUSE_HOST_KEY=SHA256:... or mount a known_hosts file then. A build
# cache keeps the scanned keys as long as the arguments and the pin file
# are unchanged; build with --no-cache to scan again.
#
# Stage order matters for the legacy builder (DOCKER_BUILDKIT=0), which
# builds every stage up to --target: runtime-base comes before the Rust
# stage, so `--target runtime-base --build-arg RUNTIME_IMAGE=<a local image>
# --build-arg WAREHOUSE_KEYSCAN=` builds the runtime image without its binary
# and without any registry image but RUNTIME_IMAGE (scripts/image-test.sh
# does that, then adds a binary built outside Docker).

ARG RUNTIME_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-slim-bookworm

# ------------------------------------------------------------------ host keys
# A throwaway stage: ssh-keyscan needs openssh-client, the runtime does not.
FROM ${RUNTIME_IMAGE} AS warehouse-host-keys
ARG WAREHOUSE_KEYSCAN=warehouse.farm.openzim.org:1522
# Extra "HOST:PORT SHA256:..." pins, ',' between them (a test warehouse's).
ARG WAREHOUSE_KEYSCAN_PINS=
SHELL ["/bin/sh", "-eu", "-c"]
COPY scripts/pin-host-keys.sh scripts/warehouse-host-keys.pin /pins/
# The image's own apt sources give the current openssh-client of bookworm.
# Only keys whose fingerprint is pinned for their HOST:PORT are kept
# (WAREHOUSE_KEYSCAN is split into its entries on purpose).
# hadolint ignore=DL3008,SC2086
RUN : >/known_hosts; \
    if [ -z "$WAREHOUSE_KEYSCAN" ]; then \
        echo "WAREHOUSE_KEYSCAN is empty: no warehouse host key in the image (set WAREHOUSE_HOST_KEY or WAREHOUSE_KNOWN_HOSTS at run time)"; \
        exit 0; \
    fi; \
    apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-client >/dev/null; \
    sh /pins/pin-host-keys.sh /pins/warehouse-host-keys.pin /known_hosts $WAREHOUSE_KEYSCAN; \
    echo "warehouse host keys installed as /usr/src/.ssh/known_hosts:"; \
    ssh-keygen -l -f /known_hosts

# ------------------------------------------------------------------ runtime base
# Everything of the final image except the binary.
FROM ${RUNTIME_IMAGE} AS runtime-base
SHELL ["/bin/sh", "-eu", "-c"]
# ca-certificates: the worker uses rustls with the system's roots for the
# dispatcher's HTTPS and the broker's amqps. Nothing else is needed: the
# binary talks to Docker, RabbitMQ and SFTP itself.
# hadolint ignore=DL3008
RUN apt-get update -q; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ca-certificates >/dev/null; \
    rm -rf /var/lib/apt/lists/*
# The non-root user (see the top of this file); no home, no shell.
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin zimfarm; \
    install -d -m 0755 /usr/src/.ssh
COPY --from=warehouse-host-keys /known_hosts /usr/src/.ssh/known_hosts
# No VOLUME for /zim_files on purpose: an anonymous volume there would
# silently split the worker's view of the task dirs from the host path the
# scrapers get (WORKING_DIR); a forgotten bind mount must fail loudly instead.
# Nor is /zim_files created: without the mount the worker finds no ZIM_DIR
# and stops at start (exit 2) with a line saying so.
# METRICS_ADDR on the container's loopback: the HEALTHCHECK (run inside the
# container) reaches it, scrapers on a Docker bridge do not. To scrape it
# from the host, see the README's "Metrics and health".
ENV ZIM_DIR=/zim_files \
    METRICS_ADDR=127.0.0.1:9090
# Prometheus metrics and /healthz (METRICS_ADDR; empty turns them off).
EXPOSE 9090
# `healthcheck` GETs http://$METRICS_ADDR/healthz: exit 0 healthy, 1 not;
# 0 with a note when METRICS_ADDR is empty. The start period covers the
# dispatcher login, the key check and the broker connection.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["zimfarm-worker", "healthcheck"]
LABEL org.opencontainers.image.title="zimfarm-worker" \
      org.opencontainers.image.description="The openZIM Zimfarm worker: runs scraper tasks from the Zimfarm dispatcher and uploads the ZIM files" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"
# No arguments: run the worker. Subcommands: run-task, check, register-key,
# healthcheck, --version (see the README).
ENTRYPOINT ["zimfarm-worker"]

# ------------------------------------------------------------------ build
FROM ${RUST_IMAGE} AS builder
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /build
# Dependencies first, on stub sources, so that a change under src/ reuses
# this layer (works with the legacy builder too, unlike cache mounts). The
# manifest names its benches explicitly, so they need stub files as well.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches; \
    echo 'fn main() {}' >src/main.rs; \
    : >src/lib.rs; \
    awk '/^\[\[bench\]\]/ { b = 1; next } /^\[/ { b = 0 } \
         b && $1 == "name" { gsub(/"/, "", $3); print "fn main() {}" > ("benches/" $3 ".rs") }' Cargo.toml; \
    cargo build --release --locked --bin zimfarm-worker; \
    rm -rf src
COPY src ./src
# touch: the stubs were written after the real files' mtimes; without it
# cargo could take the stub build as up to date.
RUN find src -name '*.rs' -exec touch {} +; \
    cargo build --release --locked --bin zimfarm-worker; \
    install -D -m 0755 target/release/zimfarm-worker /out/zimfarm-worker

# ------------------------------------------------------------------ final
FROM runtime-base AS runtime
COPY --from=builder /out/zimfarm-worker /usr/local/bin/zimfarm-worker
# Fails the build if the binary does not run on this base (libc, arch).
RUN ["zimfarm-worker", "--version"]
