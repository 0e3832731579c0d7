#!/bin/sh
# The `warehouse` service's entry point: prepare the chroot (a volume's root
# takes whatever owner and mode; sshd wants it root-owned, not writable by
# others), then run sshd in the foreground, logging to stderr.
set -eu
root=/srv/warehouse
[ -s /keys/ssh_host_ed25519_key ] || { echo "warehouse: no host key in /keys (the keys service makes it)" >&2; exit 1; }
chown root:root "$root"
chmod 755 "$root"
install -d -o zimfarm-sftp -m 755 "$root/zim" "$root/logs"
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config
