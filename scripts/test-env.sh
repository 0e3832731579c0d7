#!/usr/bin/env bash
# Prepare this machine for the test suite (scripts/test.sh runs it first).
#
# What it makes sure of, in order:
#   1. Debian packages the tests use are installed (apt-get update only when
#      one is missing).
#   2. RabbitMQ runs, listening on 127.0.0.1 only (AMQP 5672, management API
#      15672), with an administrator user zimfarm-test/zimfarm-test, and no
#      memory alarm left by a test or soak that was killed while it held one
#      (vm_memory_high_watermark back to 0.4), nor a delivery timeout left
#      lowered (consumer_timeout back to 30 min).
#   3. The Docker engine answers (dockerd is started if it does not).
#   4. <repo>/.venv holds the Python packages of tests/py/requirements.txt
#      (rebuilt only when that file changes).
#   5. The local test images of tests/images/build.sh exist and are up to
#      date (each rebuilt only when its inputs change).
#   6. What the tests' own sshd instances (tests/common/sshd.rs, one per
#      test, on 127.0.0.1) need: the system user zimfarm-sftp (no password
#      but not locked, no shell), sshd's privilege-separation dir
#      /run/sshd, and the root-owned base dir /srv/zimfarm-test-sftp of
#      their chroots. The system-wide sshd is not started.
#
# Idempotent and quick when everything is already there. Exports nothing.
# Needs root only for what it has to change (install, configure, start).
set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO/.venv"
REQUIREMENTS="$REPO/tests/py/requirements.txt"
VENV_STAMP="$VENV/.requirements.sha256"
# Debian's interpreter, not whatever python3 comes first on PATH: the venv
# must be reproducible on any Debian 12 machine.
BASE_PYTHON=/usr/bin/python3

RABBIT_USER=zimfarm-test
RABBIT_PASS=zimfarm-test
RABBIT_CONF=/etc/rabbitmq/rabbitmq.conf
RABBIT_PLUGINS=/etc/rabbitmq/enabled_plugins
RABBIT_API=http://127.0.0.1:15672/api
RABBIT_START_LOG=/tmp/rabbitmq-start.log
DOCKERD_LOG=/tmp/dockerd.log
# The SFTP warehouse of the upload tests (tests/common/sshd.rs).
SFTP_USER=zimfarm-sftp
SFTP_BASE=/srv/zimfarm-test-sftp
SSHD_PRIVSEP_DIR=/run/sshd
# Seconds to wait for a service to come up before giving up.
STARTUP_TIMEOUT=90

# debootstrap, debian-archive-keyring and docker-compose: the image test
# (scripts/image-test.sh, tests/images/debian-base.sh) and the compose lint;
# lftp and rclone: the other clients of the upload bench.
PACKAGES=(rabbitmq-server openssh-server busybox-static redis-server
    python3-venv curl shellcheck openssl debootstrap debian-archive-keyring
    docker-compose lftp rclone)

log() { printf 'test-env: %s\n' "$*" >&2; }
die() {
    printf 'test-env: ERROR: %s\n' "$*" >&2
    exit 1
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root to $1"
}

# ---------------------------------------------------------------- packages

install_packages() {
    local missing=() pkg status
    for pkg in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        [ "${status:0:2}" = ii ] || missing+=("$pkg")
    done
    # Docker comes with this kind of machine; on a bare Debian take Debian's.
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    [ "${#missing[@]}" -eq 0 ] && return 0

    require_root "install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -q || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------- RabbitMQ

# Sets RABBIT_CHANGED=1 when the broker's configuration changed, so that a
# running broker is restarted to pick it up.
RABBIT_CHANGED=0

# A private CA and a server certificate (localhost, 127.0.0.1) for the
# broker's TLS listener on 127.0.0.1:5671, which the amqps tests use.
TLS_DIR=/etc/rabbitmq/zimfarm-test-tls

ensure_tls_certificates() {
    [ -s "$TLS_DIR/ca.pem" ] && [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/server.key" ] && return 0
    require_root "create test TLS certificates in $TLS_DIR"
    log "creating a test CA and a broker certificate in $TLS_DIR"
    mkdir -p "$TLS_DIR"
    local ext
    ext=$(mktemp)
    printf '%s\n' \
        'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature, keyEncipherment' \
        'extendedKeyUsage = serverAuth' \
        'subjectAltName = DNS:localhost, IP:127.0.0.1' >"$ext"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj '/CN=zimfarm-worker test CA' \
        -addext 'basicConstraints = critical, CA:TRUE' \
        -addext 'keyUsage = critical, keyCertSign, cRLSign' \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null \
        || die "openssl could not create the test CA"
    openssl req -newkey rsa:2048 -nodes -subj '/CN=localhost' \
        -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null \
        || die "openssl could not create the broker's key"
    openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
        -CAcreateserial -days 3650 -extfile "$ext" -out "$TLS_DIR/server.pem" 2>/dev/null \
        || die "openssl could not sign the broker's certificate"
    rm -f "$ext" "$TLS_DIR/server.csr"
    chown -R rabbitmq:rabbitmq "$TLS_DIR" 2>/dev/null || true
    chmod 0644 "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" "$TLS_DIR/server.key"
}

configure_rabbitmq() {
    ensure_tls_certificates
    local wanted
    wanted=$(cat <<EOF
# Written by zimfarm-worker scripts/test-env.sh: loopback only.
listeners.tcp.default = 127.0.0.1:5672
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
management.tcp.ip = 127.0.0.1
management.tcp.port = 15672
# Queue and channel figures of the management API every 250 ms, not 5 s:
# the prefetch tests sample the unacked count through a run.
collect_statistics_interval = 250
EOF
)
    if [ "$(cat "$RABBIT_CONF" 2>/dev/null || true)" != "$wanted" ]; then
        require_root "write $RABBIT_CONF"
        log "writing $RABBIT_CONF"
        mkdir -p "$(dirname "$RABBIT_CONF")"
        printf '%s\n' "$wanted" >"$RABBIT_CONF"
        RABBIT_CHANGED=1
    fi
    if ! grep -qs 'rabbitmq_management[],]' "$RABBIT_PLUGINS"; then
        require_root "enable rabbitmq_management"
        log "enabling the rabbitmq_management plugin"
        rabbitmq-plugins enable --offline rabbitmq_management >/dev/null \
            || die "rabbitmq-plugins enable rabbitmq_management failed"
        RABBIT_CHANGED=1
    fi
}

# HTTP status of an authenticated management API call ("000": no answer).
rabbit_api_status() {
    curl -s -o /dev/null -w '%{http_code}' -m 5 \
        -u "$RABBIT_USER:$RABBIT_PASS" "$RABBIT_API/$1" || true
}

amqp_port_open() {
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null
}

# The warm path: broker up, our user can log in as administrator and has
# its permissions on "/". Only curl calls, no Erlang VM start (~1 s each).
rabbitmq_ready() {
    local me
    [ "$RABBIT_CHANGED" -eq 0 ] || return 1
    amqp_port_open || return 1
    me=$(curl -fs -m 5 -u "$RABBIT_USER:$RABBIT_PASS" "$RABBIT_API/whoami") || return 1
    [[ $me == *'"administrator"'* ]] || return 1
    [ "$(rabbit_api_status 'permissions/%2F/'"$RABBIT_USER")" = 200 ]
}

rabbit_diagnostics() {
    local f
    for f in "$RABBIT_START_LOG" /var/log/rabbitmq/startup_err \
        /var/log/rabbitmq/startup_log "/var/log/rabbitmq/rabbit@$(hostname -s).log"; do
        [ -s "$f" ] || continue
        printf -- '--- last lines of %s\n' "$f" >&2
        tail -n 20 "$f" >&2
    done
}

start_rabbitmq() {
    # Output goes to a file: a daemon must not inherit our stdout, or a
    # caller reading it through a pipe would wait for it forever.
    if command -v service >/dev/null 2>&1 && [ -x /etc/init.d/rabbitmq-server ]; then
        timeout "$STARTUP_TIMEOUT" service rabbitmq-server start \
            </dev/null >>"$RABBIT_START_LOG" 2>&1
    else
        rabbitmq-server -detached </dev/null >>"$RABBIT_START_LOG" 2>&1
    fi
}

# Waits until AMQP and the management API answer (any HTTP status).
wait_for_rabbitmq() {
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until amqp_port_open && [ "$(rabbit_api_status overview)" != 000 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            rabbit_diagnostics
            die "RabbitMQ did not open 127.0.0.1:5672 and its management API within ${STARTUP_TIMEOUT}s"
        fi
        sleep 0.2
    done
}

# (Re)makes the test user with the wanted password, tag and permissions.
# Each rabbitmqctl call starts an Erlang VM (~1 s), hence only when needed.
ensure_rabbit_user() {
    timeout "$STARTUP_TIMEOUT" rabbitmqctl -q await_startup >/dev/null \
        || die "RabbitMQ answers on its ports but rabbitmqctl cannot reach it"
    if ! rabbitmqctl -q add_user "$RABBIT_USER" "$RABBIT_PASS" >/dev/null 2>&1; then
        rabbitmqctl -q change_password "$RABBIT_USER" "$RABBIT_PASS" >/dev/null \
            || die "could not create or update the RabbitMQ user $RABBIT_USER"
    fi
    rabbitmqctl -q set_user_tags "$RABBIT_USER" administrator >/dev/null \
        || die "could not tag the RabbitMQ user $RABBIT_USER as administrator"
    rabbitmqctl -q set_permissions -p / "$RABBIT_USER" '.*' '.*' '.*' >/dev/null \
        || die "could not set the permissions of $RABBIT_USER on the vhost /"
}

ensure_rabbitmq() {
    configure_rabbitmq
    if [ "$RABBIT_CHANGED" -eq 0 ] && rabbitmq_ready; then
        return 0
    fi
    require_root "start and configure RabbitMQ"

    if amqp_port_open; then
        if [ "$RABBIT_CHANGED" -eq 1 ]; then
            log "restarting RabbitMQ to apply its new configuration"
            rabbitmqctl -q shutdown >/dev/null \
                || die "could not stop RabbitMQ to apply its new configuration"
            start_rabbitmq || true
        fi
    else
        log "starting RabbitMQ (log: $RABBIT_START_LOG)"
        start_rabbitmq || true
    fi
    wait_for_rabbitmq
    RABBIT_CHANGED=0

    if ! rabbitmq_ready; then
        log "setting up the RabbitMQ user $RABBIT_USER"
        ensure_rabbit_user
        local deadline=$((SECONDS + 10))
        until rabbitmq_ready; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                rabbit_diagnostics
                die "the management API on $RABBIT_API does not accept $RABBIT_USER as an administrator of /"
            fi
            sleep 0.2
        done
    fi
    log "RabbitMQ ready on 127.0.0.1:5672 (management API on 127.0.0.1:15672)"
}

# A test or soak that raises a memory alarm (a tiny vm_memory_high_watermark:
# every publisher blocked) restores it when it ends; one that was killed
# first leaves the broker blocking every test. Back to RabbitMQ's default
# 0.4 when the management API shows an alarm or a limit under 64 MiB (one
# rabbitmqctl call, ~1 s, only then).
reset_memory_watermark() {
    local nodes limit='' deadline=$((SECONDS + 30))
    # A broker that has just started lists its node with no figures yet
    # ("[[]]") until its first statistics tick: wait for mem_limit.
    while :; do
        nodes=$(curl -fs -m 5 -u "$RABBIT_USER:$RABBIT_PASS" \
            "$RABBIT_API/nodes?columns=mem_limit,mem_alarm") \
            || die "the management API does not list RabbitMQ's nodes"
        limit=$(grep -o '"mem_limit":[0-9]*' <<<"$nodes" | head -n 1 | cut -d: -f2 || true)
        [ -n "$limit" ] && break
        [ "$SECONDS" -lt "$deadline" ] \
            || die "the management API gave no mem_limit for RabbitMQ's node within 30s (it said: $nodes)"
        sleep 0.5
    done
    if [[ $nodes == *'"mem_alarm":true'* ]] || [ "$limit" -lt $((64 * 1024 * 1024)) ]; then
        require_root "reset RabbitMQ's vm_memory_high_watermark"
        log "resetting RabbitMQ's vm_memory_high_watermark to 0.4 (a memory alarm was left on)"
        rabbitmqctl -q set_vm_memory_high_watermark 0.4 >/dev/null \
            || die "could not reset RabbitMQ's vm_memory_high_watermark"
    fi
}

# The tests that lower the delivery timeout (tests/common/broker_wide.rs)
# restore what they found; one killed first, or two overlapping in two
# processes, leaves a short timeout that closes every long test's channel.
# Back to RabbitMQ's defaults (30 min, checked every 60 s) when it differs.
reset_delivery_timeout() {
    local now
    now=$(rabbitmqctl -q eval 'application:get_env(rabbit, consumer_timeout).' 2>/dev/null) || return 0
    case "$now" in
        '{ok,1800000}' | undefined) ;;
        *)
            require_root "reset RabbitMQ's consumer_timeout"
            log "resetting RabbitMQ's consumer_timeout to 30 min (it was $now)"
            rabbitmqctl -q eval 'application:set_env(rabbit, consumer_timeout, 1800000).' >/dev/null
            rabbitmqctl -q eval 'application:set_env(rabbit, channel_tick_interval, 60000).' >/dev/null
            ;;
    esac
}

# ------------------------------------------------------------------ Docker

ensure_docker() {
    docker info >/dev/null 2>&1 && return 0
    require_root "start dockerd"
    log "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: dockerd must outlive this script and its process group.
    setsid dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 &
    local deadline=$((SECONDS + STARTUP_TIMEOUT))
    until docker info >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$DOCKERD_LOG" >&2 || true
            die "the Docker engine did not answer within ${STARTUP_TIMEOUT}s (see $DOCKERD_LOG)"
        fi
        sleep 0.5
    done
    log "Docker engine ready"
}

# ------------------------------------------------------------------ Python

ensure_venv() {
    [ -r "$REQUIREMENTS" ] || die "missing $REQUIREMENTS"
    local wanted
    wanted=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
    if [ "$(cat "$VENV_STAMP" 2>/dev/null || true)" = "$wanted" ] \
        && "$VENV/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    log "building the Python venv $VENV from $REQUIREMENTS"
    rm -rf -- "$VENV"
    "$BASE_PYTHON" -m venv "$VENV" || die "could not create the venv $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -r "$REQUIREMENTS" || die "pip install -r $REQUIREMENTS failed"
    printf '%s\n' "$wanted" >"$VENV_STAMP"
    log "Python venv ready: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(celery|kombu|flower)==' | tr '\n' ' ')"
}

# ------------------------------------------------------------------ images

# The local images the offliner tests run (tests/images/README.md). Needs
# Docker, busybox-static, redis-server and the venv's libzim; each image is
# rebuilt only when its inputs changed (under a second when none did).
ensure_test_images() {
    bash "$REPO/tests/images/build.sh" || die "building the test images failed"
}

# ------------------------------------------------------------------- sshd

# ChrootDirectory wants every component of the chroot path root-owned and
# not writable by group or others, hence a base dir outside /tmp.
ensure_sftp_warehouse() {
    if ! id -u "$SFTP_USER" >/dev/null 2>&1; then
        require_root "create the user $SFTP_USER"
        log "creating the system user $SFTP_USER"
        useradd --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$SFTP_USER" \
            || die "useradd $SFTP_USER failed"
    fi
    # "*": no password can match, but not "locked" ("!", useradd's default),
    # which sshd refuses even for a public key when UsePAM is off. Only root
    # can read the shadow file, and the fixture needs root anyway.
    if [ "$(id -u)" -eq 0 ] && [ "$(getent shadow "$SFTP_USER" | cut -d: -f2)" != '*' ]; then
        require_root "unlock the user $SFTP_USER"
        log "setting the password of $SFTP_USER to '*' (none, not locked)"
        usermod -p '*' "$SFTP_USER" || die "usermod -p '*' $SFTP_USER failed"
    fi
    if [ ! -d "$SSHD_PRIVSEP_DIR" ]; then
        require_root "create $SSHD_PRIVSEP_DIR"
        log "creating sshd's privilege-separation dir $SSHD_PRIVSEP_DIR"
        install -d -o root -g root -m 0755 "$SSHD_PRIVSEP_DIR" \
            || die "could not create $SSHD_PRIVSEP_DIR"
    fi
    if [ "$(stat -c '%U %a' "$SFTP_BASE" 2>/dev/null || true)" != 'root 755' ]; then
        require_root "create $SFTP_BASE"
        log "creating the chroots' base dir $SFTP_BASE"
        install -d -o root -g root -m 0755 "$SFTP_BASE" \
            || die "could not create $SFTP_BASE"
    fi
}

main() {
    install_packages
    ensure_rabbitmq
    reset_memory_watermark
    reset_delivery_timeout
    ensure_docker
    ensure_venv
    ensure_test_images
    ensure_sftp_warehouse
}

main "$@"
