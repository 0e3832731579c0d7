# The `warehouse` service of docker-compose.test.yml: an OpenSSH SFTP server
# as the Zimfarm warehouse is one. Key login only, internal-sftp chrooted to
# /srv/warehouse (the `warehouse` volume) with zim/ and logs/ in it, for the
# user zimfarm-sftp, which is also the worker's USERNAME.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/ssh/ssh_host_*
# No shell, no home; password "*": no password matches, yet the account is
# not "locked" (useradd's "!"), which sshd refuses even for a key without PAM.
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin zimfarm-sftp \
    && usermod -p '*' zimfarm-sftp \
    && install -d -m 0755 /run/sshd /srv/warehouse
COPY tests/compose/warehouse_sshd_config /etc/ssh/sshd_config
COPY tests/compose/warehouse.sh /usr/local/bin/warehouse.sh
EXPOSE 1522
ENTRYPOINT ["/usr/local/bin/warehouse.sh"]
