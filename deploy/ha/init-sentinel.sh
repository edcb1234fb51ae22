#!/bin/sh
# Entrypoint of sentinel-1, sentinel-2 and sentinel-3 (deploy/ha/docker-compose.yml): on the
# first start, copies the template /relay-ha/sentinel.conf to /data/sentinel.conf (a named
# volume: Sentinel rewrites its file as it learns, and must find it again after a restart) and
# adds this instance's lines; then runs the image's own entrypoint with the command
# ("redis-server /data/sentinel.conf --sentinel").
set -eu

conf=/data/sentinel.conf
if [ ! -f "$conf" ]; then
    : "${SENTINEL_ANNOUNCE_HOSTNAME:?SENTINEL_ANNOUNCE_HOSTNAME is not set (the compose file sets it)}"
    : "${REDIS_PASSWORD:?REDIS_PASSWORD is not set: copy deploy/ha/.env.example to deploy/ha/.env}"
    cp /relay-ha/sentinel.conf "$conf"
    {
        # Announce this sentinel by its name, not its container's IP address (which changes
        # when the container is recreated and means nothing on another machine).
        echo "sentinel announce-ip $SENTINEL_ANNOUNCE_HOSTNAME"
        echo "sentinel announce-port 26379"
        # After `sentinel monitor` (it names the master set): the data nodes' password.
        echo "sentinel auth-pass mymaster $REDIS_PASSWORD"
    } >> "$conf"
fi
exec docker-entrypoint.sh "$@"
