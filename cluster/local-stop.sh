#!/usr/bin/env bash
# Stop the local cluster that cluster/local-start.sh started, and only that one: each node's
# process group gets SIGTERM (ray start --block then shuts its daemons down), SIGKILL after 30 s.
#
#   cluster/local-stop.sh          # ER_KEEP_LOGS=1 keeps Ray's logs in $ER_RAY_TMP
set -uo pipefail

DIR=${ER_LOCAL_DIR:-/tmp/er-local-ray}
RAY_TMP=${ER_RAY_TMP:-/tmp/er-ray}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

pids=()
for f in "$DIR"/worker*.pid "$DIR"/head.pid; do   # workers first, so none outlives its head
  [[ -e $f ]] && pids+=("$(cat "$f")")
done
[[ ${#pids[@]} -eq 0 ]] && { echo "no local cluster recorded in $DIR"; exit 0; }

for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
for _ in $(seq 30); do
  left=0
  for pid in "${pids[@]}"; do group_alive "$pid" && left=1; done
  [[ $left -eq 0 ]] && break
  sleep 1
done
for pid in "${pids[@]}"; do
  group_alive "$pid" && { echo "node group $pid still up; SIGKILL" >&2; kill -KILL -- "-$pid" 2>/dev/null; }
done

rm -rf "$DIR"
[[ -n ${ER_KEEP_LOGS:-} ]] || rm -rf "$RAY_TMP"
echo "local Ray cluster stopped"
