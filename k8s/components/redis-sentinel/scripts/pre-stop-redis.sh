#!/bin/sh
# Before a master stops (rollout, drain), hand its role over instead of letting the Sentinels
# wait 5 s to notice: ask them for a failover and wait, at most 10 s, until they name another
# master (clients follow them; this Redis is made a replica a few seconds later, if it is still
# up). A replica just stops.
set -u
. /scripts/lib.sh
[ "$(ask 6379 role | head -n 1)" = master ] || exit 0
me="$(hostname).${SERVICE_NAME}"
ask 26379 sentinel failover "${REDIS_SENTINEL_MASTER}" || exit 0
tries=0
while [ "$tries" -lt 20 ] &&
  [ "$(ask 26379 sentinel get-master-addr-by-name "${REDIS_SENTINEL_MASTER}" | head -n 1)" = "$me" ]; do
  sleep 0.5
  tries=$((tries + 1))
done
