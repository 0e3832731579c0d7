# Sourced (not run) by scripts/farm.sh and scripts/image-test.sh: the parts
# of a local farm they both start the same way, on 127.0.0.1 only, once
# scripts/test-env.sh has made the machine ready (RabbitMQ, the zimfarm-sftp
# user, /srv/zimfarm-test-sftp, .venv). Run from the repository's root.
#
# Every background process started here is appended to FARM_PIDS; the
# caller stops them (its own cleanup trap).
# shellcheck shell=bash

FARM_PIDS=()

# A free TCP port on 127.0.0.1.
farm_free_port() {
    .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 5 s for 127.0.0.1:PORT to accept connections.
farm_wait_port() {
    local port=$1 _
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# farm_vhost API VHOST USER: the vhost, with every permission for USER.
farm_vhost() {
    local api=$1 vhost=$2 user=$3
    curl -fsS -X PUT -H 'content-type: application/json' -d '{}' "$api/vhosts/$vhost" >/dev/null
    curl -fsS -X PUT -H 'content-type: application/json' \
        -d '{"configure":".*","write":".*","read":".*"}' "$api/permissions/$vhost/$user" >/dev/null
}

# farm_start_warehouse WORK CHROOT USER AUTHORIZED_KEY: OpenSSH's sshd as
# the SFTP warehouse on a free port (set in FARM_SFTP_PORT), chrooted in
# CHROOT (root-owned, mode 755, under /srv/zimfarm-test-sftp: sshd wants
# every component of it so), with zim/ and logs/ made for USER, who may
# log in with AUTHORIZED_KEY (a .pub file) only. Its host key is
# WORK/host_key(.pub); WORK is made readable (sshd reads authorized_keys
# as USER). Returns 1, with sshd's log on stderr, if it does not listen.
farm_start_warehouse() {
    local work=$1 chroot=$2 user=$3 authorized=$4
    install -d -o "$user" -m 755 "$chroot/zim" "$chroot/logs"
    ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
    cp "$authorized" "$work/authorized_keys"
    chmod 755 "$work"
    FARM_SFTP_PORT=$(farm_free_port)
    printf '%s\n' \
        "ListenAddress 127.0.0.1:$FARM_SFTP_PORT" \
        "HostKey $work/host_key" \
        "PidFile $work/sshd.pid" \
        "AuthorizedKeysFile $work/authorized_keys" \
        "StrictModes no" \
        "PubkeyAuthentication yes" \
        "PasswordAuthentication no" \
        "KbdInteractiveAuthentication no" \
        "UsePAM no" \
        "AllowUsers $user" \
        "Subsystem sftp internal-sftp" \
        "ForceCommand internal-sftp" \
        "ChrootDirectory $chroot" >"$work/sshd_config"
    /usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
    FARM_PIDS+=($!)
    farm_wait_port "$FARM_SFTP_PORT" || {
        cat "$work/sshd.log" >&2
        return 1
    }
}

# farm_start_standin STANDIN WORK USER PASSWORD PUBLIC_KEY: the dispatcher
# stand-in (examples/dispatcher_standin) knowing USER with PASSWORD and
# PUBLIC_KEY registered; its API base URL is set in FARM_DISPATCHER_URL.
# Returns 1, with its log on stderr, if it does not start.
farm_start_standin() {
    local standin=$1 work=$2 user=$3 password=$4 key=$5 _
    "$standin" --user "$user" --password "$password" --public-key "$key" \
        >"$work/dispatcher.out" 2>"$work/dispatcher.log" &
    FARM_PIDS+=($!)
    for _ in $(seq 100); do
        grep -q '^DISPATCHER_URL=' "$work/dispatcher.out" 2>/dev/null && break
        sleep 0.05
    done
    FARM_DISPATCHER_URL=$(sed -n 's/^DISPATCHER_URL=//p' "$work/dispatcher.out")
    [ -n "$FARM_DISPATCHER_URL" ] || {
        cat "$work/dispatcher.log" >&2
        return 1
    }
}
