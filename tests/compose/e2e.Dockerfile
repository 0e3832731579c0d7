# The `e2e` service of docker-compose.test.yml: Python Celery (as the
# dispatcher uses it), libzim, the docker CLI, and what tests/images/build.sh
# copies into the stand-in scraper images (Debian's busybox-static and
# redis-server). Build context: the repo.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG DOCKER_CLI_IMAGE=docker:27-cli

# The docker CLI is a static binary: take it from the official image rather
# than Debian's docker.io, which brings a whole engine along.
FROM ${DOCKER_CLI_IMAGE} AS docker-cli

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        busybox-static redis-server \
    && rm -rf /var/lib/apt/lists/*
COPY --from=docker-cli /usr/local/bin/docker /usr/local/bin/docker
WORKDIR /repo
# tests/images/build.sh finds the venv at <repo>/.venv, as test-env.sh makes it.
COPY tests/py/requirements.txt tests/py/requirements.txt
RUN python3 -m venv .venv \
    && .venv/bin/pip install --no-cache-dir -q --disable-pip-version-check -r tests/py/requirements.txt
COPY tests ./tests
ENTRYPOINT ["bash", "tests/compose/e2e.sh"]
