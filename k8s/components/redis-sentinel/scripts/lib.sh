#!/bin/sh
# Functions shared by the scripts beside it (sourced, never run).

# The password, from the Secret mounted as a file (not in the pod spec nor on a command line).
password() { cat /etc/redis-auth/password; }

# redis-cli on this pod: ask PORT COMMAND...
ask() {
  port=$1
  shift
  REDISCLI_AUTH="$(password)" timeout 3 redis-cli --no-auth-warning --raw -p "$port" "$@"
}

# The master's host as any reachable Sentinel of the set names it, or nothing.
current_master() {
  i=0
  while [ "$i" -lt "$REPLICAS" ]; do
    peer="${STATEFULSET_NAME}-${i}.${SERVICE_NAME}"
    host=$(REDISCLI_AUTH="$(password)" timeout 3 redis-cli --no-auth-warning --raw -h "$peer" \
      -p 26379 sentinel get-master-addr-by-name "${REDIS_SENTINEL_MASTER}" 2>/dev/null |
      head -n 1) || host=""
    if [ -n "$host" ]; then
      echo "$host"
      return 0
    fi
    i=$((i + 1))
  done
}
