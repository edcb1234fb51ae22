#!/bin/sh
# Entrypoint of redis-1 and redis-2 (deploy/ha/docker-compose.yml): prepares /data/redis.conf,
# then runs the image's own entrypoint with the command ("redis-server /data/redis.conf ...").
#
# Why a config file, written once: during a failover Sentinel turns a node into a replica (or a
# replica into the primary) and persists that with CONFIG REWRITE, which needs a config file.
# A role given on the command line (--replicaof) would be applied again at every restart and
# undo the failover: a restarted redis-2 would follow redis-1 again even after redis-2 became
# the primary. So the starting role goes into the file on the first start only
# (REDIS_FIRST_PRIMARY, set for the replica), and from then on the file, as Sentinel rewrote
# it, decides. Settings that never change (AOF, noeviction, the announced name) stay on the
# command line, which wins over the file at every start.
set -eu

conf=/data/redis.conf
if [ ! -f "$conf" ]; then
    : > "$conf"
    if [ -n "${REDIS_FIRST_PRIMARY:-}" ]; then
        echo "replicaof $REDIS_FIRST_PRIMARY 6379" >> "$conf"
    fi
fi

# The password: every client (the hub, redis-cli, the sentinels) must give it, and a replica
# gives it to its primary (masterauth) - set on both nodes since their roles swap. Passed here,
# not in the compose file, so it stays out of `docker compose config` and `docker inspect`'s
# command line.
: "${REDIS_PASSWORD:?REDIS_PASSWORD is not set: copy deploy/ha/.env.example to deploy/ha/.env}"
exec docker-entrypoint.sh "$@" --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD"
