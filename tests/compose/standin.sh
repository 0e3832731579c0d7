#!/bin/bash
# The `standin` service's entry point: the dispatcher stand-in, reachable by
# the other services as http://standin:8080/api.
#
# dispatcher_standin binds 127.0.0.1 only (tests/common/dispatcher.rs), so
# it listens on 127.0.0.1:8081 and socat forwards 0.0.0.0:8080 to it. Once
# the stand-in can bind another address, run it on 0.0.0.0:8080 directly
# and drop socat. Its flags come from the environment (clap `env`):
# STANDIN_USER, STANDIN_PASSWORD, STANDIN_PUBLIC_KEY, STANDIN_EXPIRES_IN.
set -euo pipefail
export STANDIN_PORT=8081

dispatcher_standin &
standin=$!
socat TCP-LISTEN:8080,fork,reuseaddr TCP:127.0.0.1:8081 &
proxy=$!
trap 'kill "$standin" "$proxy" 2>/dev/null; wait; exit 0' TERM INT
# Either one ending ends the service (and fails the compose run).
wait -n
status=$?
kill "$standin" "$proxy" 2>/dev/null || true
exit "$status"
