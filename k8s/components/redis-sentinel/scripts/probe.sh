#!/bin/sh
# The probes: healthy when this pod's server on port $1 (6379: Redis; 26379: Sentinel) answers
# PONG to an authenticated PING.
. /scripts/lib.sh
[ "$(ask "$1" ping)" = PONG ]
