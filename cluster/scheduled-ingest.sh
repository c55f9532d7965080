#!/usr/bin/env bash
# Incremental ingestion from cron on a plain VM: embed what is new in CORPUS into CACHE on the
# Ray cluster at RAY_ADDRESS. `er ingest` skips examples already cached, so each run costs only
# what arrived since the last one. Two runs into the same cache never overlap on this host
# (flock); a run that finds one still going logs that and exits 0.
#
# Example crontab line (crontab -e), 03:00 daily; cron's PATH is short, so name er by its path:
#   0 3 * * *  CORPUS=s3://corpus/incoming/ CACHE=s3://my-bucket/er-cache ER=/opt/er/.venv/bin/er /opt/er/cluster/scheduled-ingest.sh >>/var/log/er-ingest.log 2>&1
#
# Extra arguments go to `er ingest` (e.g. --layer 6 --codec int8). Exit status: er's own.
set -euo pipefail

: "${CORPUS:?set CORPUS, e.g. s3://corpus/incoming/}"
: "${CACHE:?set CACHE, e.g. s3://my-bucket/er-cache}"
ER=${ER:-er}
ADDRESS=${RAY_ADDRESS:-auto}             # auto: the cluster this VM's `ray start` joined
# One lock per cache, so ingests into different caches may run side by side.
LOCK=${ER_INGEST_LOCK:-${TMPDIR:-/tmp}/er-ingest-$(printf '%s' "$CACHE" | cksum | cut -d' ' -f1).lock}

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

exec 9>>"$LOCK"
if ! flock -n 9; then
  log "skip: an ingest into $CACHE is still running (pid $(head -c 32 "$LOCK" 2>/dev/null || true), lock $LOCK)"
  exit 0
fi
echo $$ >"$LOCK"

log "start: er ingest $CORPUS --cache $CACHE --address $ADDRESS $*"
start=$SECONDS
set +e
# 9>&-: er must not hand the lock to the Ray processes it may start, or it would outlive this run.
"$ER" ingest "$CORPUS" --cache "$CACHE" --address "$ADDRESS" "$@" 9>&- 2>&1 |
  while IFS= read -r line; do log "  $line"; done
rc=${PIPESTATUS[0]}
set -e

if [[ $rc -eq 0 ]]; then
  log "done in $((SECONDS - start)) s"
else
  log "FAILED with exit code $rc after $((SECONDS - start)) s"
fi
exit "$rc"
