#!/usr/bin/env bash
# Incremental ingestion from cron on a plain VM: embed what is new in CORPUS into CACHE, as a job
# submitted to the Ray cluster's Jobs API (its dashboard, http://HEAD:8265). `er ingest` skips
# examples already cached, so each run costs only what arrived since the last one.
#
# Example crontab line (crontab -e), 03:00 daily; cron's PATH is short, so put the ray CLI on it:
#   0 3 * * *  PATH=/opt/er/.venv/bin:/usr/bin:/bin CORPUS=s3://corpus/incoming/ CACHE=s3://my-bucket/er-cache /opt/er/cluster/scheduled-ingest.sh >>/var/log/er-ingest.log 2>&1
#
# Idempotent, as cluster/kuberay/cronjob-ingest.yaml: the submission id is fixed per scheduled day
# (UTC), so a second run the same day (a retry, a run by hand) finds the id taken ("already
# exists"), follows that job and submits nothing twice. ER_SUBMISSION_ID overrides the id, for a
# deliberate second run. Two runs on this host never overlap (flock); one that finds another still
# going logs that and exits 0.
#
# The job runs on the cluster's nodes, with their er and their credentials (instance role, their
# environment); this host needs only the ray CLI. ER names er on the nodes (default `er`). Extra
# arguments go to `er ingest` (e.g. --layer 6 --codec int8). ER_COMPACT=1 then submits `er cache compact CACHE`
# as a second job (id <ID>-compact) once the ingest SUCCEEDED: each run adds a few small shards, and compaction
# merges them; readers that are running keep their version. Exit status: 0 when every job SUCCEEDED.
set -euo pipefail

: "${CORPUS:?set CORPUS, e.g. s3://corpus/incoming/}"
: "${CACHE:?set CACHE, e.g. s3://my-bucket/er-cache}"
ER=${ER:-er}
ADDRESS=${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}   # the head's Jobs API (dashboard port)
ID=${ER_SUBMISSION_ID:-er-ingest-$(date -u +%Y%m%d)}
# A python that has ray (the one beside the ray CLI), to read the job's final status.
PY=${PYTHON:-$(dirname "$(command -v ray)")/python}
[[ -x $PY ]] || PY=python3
# One lock per cache, so ingests into different caches may run side by side.
LOCK=${ER_INGEST_LOCK:-${TMPDIR:-/tmp}/er-ingest-$(printf '%s' "$CACHE" | cksum | cut -d' ' -f1).lock}

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

exec 9>>"$LOCK"
if ! flock -n 9; then
  log "skip: an ingest into $CACHE is still running (pid $(head -c 32 "$LOCK" 2>/dev/null || true), lock $LOCK)"
  exit 0
fi
echo $$ >"$LOCK"

log "submit $ID to $ADDRESS: er ingest $CORPUS --cache $CACHE $*"
start=$SECONDS
set +e
# 9>&-: the ray CLI must not hand the lock on to anything it starts.
# shellcheck disable=SC2086  # ER may be several words, e.g. "python -m pipelines.cli"
out=$(ray job submit --address "$ADDRESS" --submission-id "$ID" --no-wait -- \
  $ER ingest "$CORPUS" --cache "$CACHE" "$@" 9>&- 2>&1)
rc=$?
set -e
printf '%s\n' "$out" | while IFS= read -r line; do log "  $line"; done
if [[ $rc -ne 0 ]]; then
  case "$out" in   # Ray refuses a taken submission id with "... already exists ..."
    *"already exists"*) log "$ID was submitted before: following it, not submitting it again" ;;
    *) log "FAILED to submit (exit code $rc)"; exit "$rc" ;;
  esac
fi

# Follow a submitted job to its end; its status SUCCEEDED or not.
follow() {
  ray job logs --address "$ADDRESS" --follow "$1" 9>&- 2>&1 | while IFS= read -r line; do log "  $line"; done
  # `ray job status` exits 0 whatever the status; the SDK says which it is.
  status=$("$PY" -c 'import sys; from ray.job_submission import JobSubmissionClient as C; print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$1" 9>&-) || {
    log "FAILED to read the status of $1"; return 1; }
  log "Ray job $1: $status after $((SECONDS - start)) s"
  [[ $status == SUCCEEDED ]]
}

follow "$ID"
if [[ ${ER_COMPACT:-0} == 1 ]]; then
  log "submit $ID-compact to $ADDRESS: er cache compact $CACHE"
  # A second run the same day finds the id taken (Ray says so): it follows that job, as for the ingest.
  # shellcheck disable=SC2086
  { ray job submit --address "$ADDRESS" --submission-id "$ID-compact" --no-wait -- \
      $ER cache compact "$CACHE" 9>&- 2>&1 || true; } | while IFS= read -r line; do log "  $line"; done
  follow "$ID-compact"
fi
