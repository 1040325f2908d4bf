#!/bin/sh
# Before a master stops (rollout, drain), hand its role over instead of letting the Sentinels
# wait 5 s to notice: ask them for a failover and wait, at most 10 s, until this Redis is a
# replica. A replica just stops.
set -u
. /scripts/lib.sh
[ "$(ask 6379 role | head -n 1)" = master ] || exit 0
ask 26379 sentinel failover "${REDIS_SENTINEL_MASTER}" || exit 0
tries=0
while [ "$tries" -lt 20 ] && [ "$(ask 6379 role | head -n 1)" = master ]; do
  sleep 0.5
  tries=$((tries + 1))
done
