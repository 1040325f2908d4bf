#!/bin/sh
# This pod's Redis: the master the Sentinels name, or a replica of it. On the very first start
# no Sentinel knows a master yet and pod 0 becomes it. Ephemeral like every channel-layer Redis:
# no RDB, no AOF, and replicas sync without touching the disk.
set -eu
. /scripts/lib.sh
me="$(hostname).${SERVICE_NAME}"
master="$(current_master)"
[ -n "$master" ] || master="${STATEFULSET_NAME}-0.${SERVICE_NAME}"
config=/data/redis.conf
umask 077
cat >"$config" <<CONF
port 6379
requirepass "$(password)"
masterauth "$(password)"
replica-announce-ip $me
maxmemory ${REDIS_MAXMEMORY}
maxmemory-policy noeviction
save ""
appendonly no
repl-diskless-sync yes
repl-diskless-load on-empty-db
maxclients 10000
tcp-keepalive 60
CONF
if [ "$master" != "$me" ]; then
  echo "replicaof $master 6379" >>"$config"
fi
echo "starting as $([ "$master" = "$me" ] && echo master || echo "replica of $master")"
exec redis-server "$config"
