#!/bin/sh
# This pod's Sentinel: monitors the current master (the one its peers name, else pod 0) under
# REDIS_SENTINEL_MASTER, announces itself by its stable DNS name, and rewrites its own config
# file (on an emptyDir) as the master changes.
set -eu
. /scripts/lib.sh
me="$(hostname).${SERVICE_NAME}"
master="$(current_master)"
[ -n "$master" ] || master="${STATEFULSET_NAME}-0.${SERVICE_NAME}"
config=/sentinel/sentinel.conf
umask 077
cat >"$config" <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $me
requirepass "$(sentinel_password)"
sentinel sentinel-pass "$(sentinel_password)"
sentinel monitor ${REDIS_SENTINEL_MASTER} $master 6379 2
sentinel auth-pass ${REDIS_SENTINEL_MASTER} "$(password)"
sentinel down-after-milliseconds ${REDIS_SENTINEL_MASTER} 5000
sentinel failover-timeout ${REDIS_SENTINEL_MASTER} 60000
sentinel parallel-syncs ${REDIS_SENTINEL_MASTER} 1
CONF
exec redis-sentinel "$config"
