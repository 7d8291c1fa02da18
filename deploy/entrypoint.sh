#!/bin/sh
# Container entrypoint. The image is started three ways, and each must reach
# the agent with its arguments intact:
#   docker compose  command: ["/app/lightshark-mini", "--db-path", "/data/traffic.db"]
#                   -> arguments name a program: run them as given
#   k8s sidecar     args: ["--interface", "eth0", "--quiet"]
#                   -> arguments are flags: run the agent with them
#   kubectl debug   ... -- /app/lightshark-mini --interface eth0
#                   -> replaces the entrypoint itself; this script is not run
# With no arguments at all the agent runs with its defaults.
set -eu
app="${LIGHTSHARK_BIN:-/app/lightshark-mini}"
if [ "$#" -eq 0 ]; then
    exec "$app"
fi
case "$1" in
    -*) exec "$app" "$@" ;;
    *) exec "$@" ;;
esac
