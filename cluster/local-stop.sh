#!/usr/bin/env bash
# Stop the local cluster that cluster/local-start.sh started, and only that one.
# Each node's `ray start --block` gets SIGTERM: it drains the node and ends the daemons it
# started. Whatever of its process group is still up after 40 s gets SIGKILL.
#
#   cluster/local-stop.sh          # ER_KEEP_LOGS=1 keeps Ray's logs in $ER_RAY_TMP
set -uo pipefail

DIR=${ER_LOCAL_DIR:-/tmp/er-local-ray}
RAY_TMP=${ER_RAY_TMP:-/tmp/er-ray}

group_alive() { [[ -n $(ps -o pid= -g "$1" 2>/dev/null) ]]; }

stop_node() {   # stop_node PIDFILE
  local pid deadline
  pid=$(cat "$1")
  # Only the leader: signalling the whole group kills raylet/GCS under the drain, which then hangs.
  kill -TERM "$pid" 2>/dev/null
  deadline=$((SECONDS + 40))
  while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if group_alive "$pid"; then
    echo "$(basename "$1" .pid) (group $pid) did not stop in 40 s; SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null
  fi
}

shopt -s nullglob
files=("$DIR"/worker*.pid)
[[ -e $DIR/head.pid ]] || [[ ${#files[@]} -gt 0 ]] || { echo "no local cluster recorded in $DIR"; exit 0; }
for f in "${files[@]}"; do stop_node "$f" & done   # workers first and together, then the head
wait
[[ -e $DIR/head.pid ]] && stop_node "$DIR/head.pid"

rm -rf "$DIR"
[[ -n ${ER_KEEP_LOGS:-} ]] || rm -rf "$RAY_TMP"
echo "local Ray cluster stopped"
