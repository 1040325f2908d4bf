#!/bin/sh
# Functions shared by the scripts beside it (sourced, never run).

# The passwords, from the Secret mounted as files (not in the pod spec nor on a command line):
# the Redis servers' (REDIS_PASSWORD) and the Sentinels' own (REDIS_SENTINEL_PASSWORD).
password() { cat /etc/redis-auth/password; }
sentinel_password() { cat /etc/redis-auth/sentinel-password; }

# The password of the server on PORT (26379: a Sentinel; else a Redis).
password_for() {
  if [ "$1" = 26379 ]; then sentinel_password; else password; fi
}

# redis-cli on this pod: ask PORT COMMAND...
ask() {
  port=$1
  shift
  REDISCLI_AUTH="$(password_for "$port")" timeout 3 redis-cli --no-auth-warning --raw -p "$port" "$@"
}

# The master's host as any reachable Sentinel of the set names it, or nothing.
current_master() {
  i=0
  while [ "$i" -lt "$REPLICAS" ]; do
    peer="${STATEFULSET_NAME}-${i}.${SERVICE_NAME}"
    host=$(REDISCLI_AUTH="$(sentinel_password)" timeout 3 redis-cli --no-auth-warning --raw -h "$peer" \
      -p 26379 sentinel get-master-addr-by-name "${REDIS_SENTINEL_MASTER}" 2>/dev/null |
      head -n 1) || host=""
    if [ -n "$host" ]; then
      echo "$host"
      return 0
    fi
    i=$((i + 1))
  done
}
