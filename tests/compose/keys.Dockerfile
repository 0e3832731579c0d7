# The `keys` service of docker-compose.test.yml: makes the SSH keys the
# other services share through the `keys` volume (tests/compose/keys.sh).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*
COPY tests/compose/keys.sh /usr/local/bin/keys.sh
ENTRYPOINT ["/usr/local/bin/keys.sh"]
