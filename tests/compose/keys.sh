#!/bin/sh
# The `keys` service of docker-compose.test.yml. Writes into /keys (the
# `keys` volume), once:
#   id_rsa, id_rsa.pub          the worker's SSH key (RSA, PEM, as the seed's)
#   authorized_keys             that public key, for the warehouse's sshd
#   ssh_host_ed25519_key{,.pub} the warehouse's host key
#   known_hosts                 [warehouse]:1522 and that host key, for the worker
#   .ready                      all of the above are there (the healthcheck)
# then waits until it is stopped: with --abort-on-container-exit (which
# --exit-code-from implies) docker-compose v1 ends the whole run as soon as
# any container exits, so a one-shot service cannot be used.
set -eu
dir=/keys
host=${WAREHOUSE_HOST:-warehouse}
port=${WAREHOUSE_PORT:-1522}

chmod 755 "$dir"
if [ ! -s "$dir/id_rsa" ]; then
    ssh-keygen -q -t rsa -b 3072 -m PEM -N '' -C zimfarm-sftp@compose -f "$dir/id_rsa"
fi
if [ ! -s "$dir/ssh_host_ed25519_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "$host" -f "$dir/ssh_host_ed25519_key"
fi
cp "$dir/id_rsa.pub" "$dir/authorized_keys"
printf '[%s]:%s %s\n' "$host" "$port" "$(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")" >"$dir/known_hosts"
# Readable by sshd's unprivileged user (authorized_keys); secrets root-only.
chmod 644 "$dir/id_rsa.pub" "$dir/authorized_keys" "$dir/known_hosts" "$dir/ssh_host_ed25519_key.pub"
chmod 600 "$dir/id_rsa" "$dir/ssh_host_ed25519_key"
touch "$dir/.ready"
echo "keys: worker key $(ssh-keygen -l -f "$dir/id_rsa.pub" | cut -d' ' -f2), warehouse host key $(ssh-keygen -l -f "$dir/ssh_host_ed25519_key.pub" | cut -d' ' -f2)"

trap 'exit 0' TERM INT
sleep infinity &
wait
