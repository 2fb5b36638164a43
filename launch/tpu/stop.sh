#!/usr/bin/env bash
# Stop a job started by run.sh on every worker.
#
# Usage: launch/tpu/stop.sh [JOB]
#
# JOB defaults to the last job run.sh started. Sends SIGTERM to the job's process group on each worker (read
# from LOG_DIR/JOB.pid), waits up to STOP_GRACE seconds, then sends SIGKILL to what is left, so the TPU is
# free for the next job. Nothing is lost beyond the steps after the last complete checkpoint: run.sh with
# the same arguments resumes from it.
#
# More settings:
#   STOP_GRACE  seconds between SIGTERM and SIGKILL          default: 30
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -le 1 ]] || die "usage: launch/tpu/stop.sh [JOB] (see --help)"
: "${STOP_GRACE:=30}"
[[ "$STOP_GRACE" =~ ^[0-9]+$ ]] || die "STOP_GRACE=$STOP_GRACE is not a number of seconds"
job="${1:-}"
[[ "$job" =~ ^[A-Za-z0-9_.-]*$ ]] || die "bad job name: $job"

logs="$(rpath "$LOG_DIR")"
if [[ -z "$job" ]]; then
  job_word="\"\$(cat $logs/latest 2>/dev/null || true)\""
else
  job_word="$job"
fi
tpu_ssh "$WORKERS" "set -uo pipefail
$REMOTE_FUNCS
job=$job_word
pid_file=$logs/\$job.pid
if [[ -z \"\$job\" || ! -f \"\$pid_file\" ]] || ! group_alive \"\$(cat \"\$pid_file\")\"; then
  echo \"\$(hostname): \${job:-no job} is not running\"
  exit 0
fi
pid=\$(cat \"\$pid_file\")
kill -TERM -- -\"\$pid\" 2>/dev/null || kill -TERM \"\$pid\"
for ((i = 0; i < $((STOP_GRACE * 5)); i++)); do
  group_alive \"\$pid\" || break
  sleep 0.2
done
kill -KILL -- -\"\$pid\" 2>/dev/null || true
echo \"\$(hostname): stopped \$job (process group \$pid)\""
