#!/usr/bin/env bash
# Start a multi-node Ray cluster on this one machine: a head and N worker nodes, each its own
# raylet with its own CPUs, so Ray Data / Ray Train spread over several nodes as on a real cluster.
#
#   cluster/local-start.sh [N_WORKERS]        # default 1 worker node; or: make cluster-up WORKERS=N
#   export RAY_ADDRESS=127.0.0.1:6390         # printed at the end; then e.g.
#   er ingest corpus.jsonl --cache /tmp/er-cache --address "$RAY_ADDRESS"
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- er cache info /tmp/er-cache
#   cluster/local-stop.sh
#
# The head serves the dashboard and the Jobs API (`ray job submit/status/logs`, needs ray[default])
# on 127.0.0.1:$ER_DASHBOARD_PORT (8265); ER_RAY_DASHBOARD=false leaves them out.
#
# Each node runs `ray start --block` in its own process group; their ids go to $ER_LOCAL_DIR so
# local-stop.sh ends exactly these processes (no `ray stop`, which would kill every Ray on the host).
set -euo pipefail

WORKERS=${1:-${ER_LOCAL_WORKERS:-1}}
PORT=${ER_RAY_PORT:-6390}                     # GCS port of the head; not 6379, to leave the default free
CPUS=${ER_NODE_CPUS:-2}                       # logical CPUs per node; may exceed the real cores
OBJ_MEM=${ER_OBJECT_STORE_BYTES:-500000000}   # per node; Ray's default (30% of RAM) is too much times N
DIR=${ER_LOCAL_DIR:-/tmp/er-local-ray}        # pids and logs of the nodes started here
# Ray's own files. Not /tmp/ray: a head there becomes the cluster that a plain ray.init() on
# this host joins. Kept short because Ray puts unix sockets under it (108-byte limit).
RAY_TMP=${ER_RAY_TMP:-/tmp/er-ray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # Ray 2.60 turns token auth on; off for local use
export RAY_USAGE_STATS_ENABLED=0

if [[ -e "$DIR/head.pid" ]]; then
  echo "a local cluster is already started from $DIR; run cluster/local-stop.sh first" >&2
  exit 1
fi
mkdir -p "$DIR" "$RAY_TMP"

# A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (where any
# outgoing connection could take it before Ray binds it), or above that range where the gap is
# small; never one this script already gave out (listed in $DIR/ports).
free_port() {
  python3 - "$DIR/ports" <<'PY'
import os, random, socket, sys
try:
    first, last = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[:2])
except (OSError, ValueError):
    first, last = 32768, 60999
low, high = (max(20000, first - 12000), first) if first - 20000 >= 1000 else (last + 1, 65536)
given = set(open(sys.argv[1]).read().split()) if os.path.exists(sys.argv[1]) else set()
for _ in range(1000):
    port = random.randrange(low, high)
    if str(port) in given:
        continue
    try:
        for host in ("0.0.0.0", "127.0.0.1"):
            with socket.socket() as s:
                s.bind((host, port))
    except OSError:
        continue
    open(sys.argv[1], "a").write(f"{port}\n")
    print(port)
    break
else:
    sys.exit("no free port found")
PY
}

# Two nodes on one host must not share any listening port; Ray's defaults for the agent
# (52365) would collide, so every per-node port is picked free.
# Called as `ports=$(node_ports) || exit 1`: a flag without its port must not reach ray start.
node_ports() {
  local name port flags=""
  for name in node-manager object-manager dashboard-agent-listen dashboard-agent-grpc runtime-env-agent metrics-export; do
    port=$(free_port) || return 1
    flags+=" --$name-port=$port"
  done
  echo "$flags"
}

# setsid: each node gets its own process group (pgid = the pid we record), so local-stop.sh
# can find, and if need be kill, every daemon that node's `ray start` spawned.
start_node() {
  local name=$1; shift
  setsid ray start --block --disable-usage-stats --temp-dir="$RAY_TMP" \
    --num-cpus="$CPUS" --object-store-memory="$OBJ_MEM" "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

alive_nodes() {
  ray status --address="127.0.0.1:$PORT" 2>/dev/null |
    awk '/^Active:/{a=1;next} /^(Pending|Recent failures):/{a=0} a && /node_/{n++} END{print n+0}'
}

wait_nodes() {   # wait_nodes COUNT: until `ray status` shows COUNT active nodes (90 s)
  local deadline=$((SECONDS + 90)) f
  while ((SECONDS < deadline)); do
    [[ $(alive_nodes) -ge $1 ]] && return 0
    for f in "$DIR"/*.pid; do
      kill -0 "$(cat "$f")" 2>/dev/null || { echo "node $(basename "$f" .pid) exited:" >&2; tail -5 "${f%.pid}.log" >&2; return 1; }
    done
    sleep 1
  done
  echo "only $(alive_nodes) of $1 nodes came up in 90 s; logs in $DIR" >&2
  return 1
}

# Ray advertises this host's own IP for every node (it maps 127.0.0.1 to it); all traffic stays
# on this machine. With grpcio installed (ray[default] brings it) the head also serves Ray Client
# (ray://), on 10001 by default: here on a free port (ER_RAY_CLIENT_PORT to choose one), so that
# a second head on this host does not fight over 10001. er uses the Jobs API, not ray://.
DASHBOARD=${ER_RAY_DASHBOARD:-true}
DASH_PORT=${ER_DASHBOARD_PORT:-8265}
dashboard_flags=(--include-dashboard="$DASHBOARD")
[[ $DASHBOARD == true ]] && dashboard_flags+=(--dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT")
client_port=${ER_RAY_CLIENT_PORT:-$(free_port)} || exit 1
ports=$(node_ports) || exit 1
# shellcheck disable=SC2086  # $ports is meant to split into separate flags
start_node head --head --port="$PORT" "${dashboard_flags[@]}" --ray-client-server-port="$client_port" $ports
wait_nodes 1 || { bash "$(dirname "$0")/local-stop.sh"; exit 1; }

for i in $(seq "$WORKERS"); do
  ports=$(node_ports) || { bash "$(dirname "$0")/local-stop.sh"; exit 1; }
  # shellcheck disable=SC2086
  start_node "worker$i" --address="127.0.0.1:$PORT" $ports
done
wait_nodes $((WORKERS + 1)) || { bash "$(dirname "$0")/local-stop.sh"; exit 1; }

# The Jobs API answers once the dashboard is up (a few seconds after the head); a taken port shows here.
if [[ $DASHBOARD == true ]]; then
  deadline=$((SECONDS + 60))
  until python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$DASH_PORT/api/version" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "the dashboard did not answer on 127.0.0.1:$DASH_PORT in 60 s (port taken? ER_DASHBOARD_PORT=...);" \
           "see $RAY_TMP/session_latest/logs/dashboard.log" >&2
      bash "$(dirname "$0")/local-stop.sh"; exit 1
    fi
    sleep 1
  done
fi

echo "local Ray cluster up: 1 head + $WORKERS worker node(s), $CPUS CPUs each"
echo "export RAY_ADDRESS=127.0.0.1:$PORT RAY_AUTH_MODE=$RAY_AUTH_MODE"
[[ $DASHBOARD == true ]] && echo "dashboard and Jobs API: http://127.0.0.1:$DASH_PORT (ray job submit --address http://127.0.0.1:$DASH_PORT ...)"
exit 0
