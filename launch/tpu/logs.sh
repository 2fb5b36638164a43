#!/usr/bin/env bash
# Show, and follow while it runs, the log of a job started by run.sh.
#
# Usage: launch/tpu/logs.sh [JOB]
#
# JOB defaults to the last job run.sh started. Prints the last LOG_LINES lines of LOG_DIR/JOB.log on worker
# LOG_WORKER and, while the job runs, follows it (tail -F) until the job ends; Ctrl-C stops following only.
# Every worker writes its own log; worker 0 carries the progress bar and the metrics. To look at all of them:
#   launch/tpu/ssh.sh 'tail -n 5 qzoom_logs/JOB.log'
#
# More settings:
#   LOG_WORKER  worker whose log is shown                    default: 0 (or WORKERS when that is one index)
#   LOG_LINES   lines shown before following, +1 = all       default: 100
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -le 1 ]] || die "usage: launch/tpu/logs.sh [JOB] (see --help)"
if [[ "$WORKERS" == all ]]; then
  : "${LOG_WORKER:=0}"
else
  : "${LOG_WORKER:=$WORKERS}"
fi
: "${LOG_LINES:=100}"
job="${1:-}"
[[ "$job" =~ ^[A-Za-z0-9_.-]*$ ]] || die "bad job name: $job"

logs="$(rpath "$LOG_DIR")"
if [[ -z "$job" ]]; then
  job_word="\"\$(cat $logs/latest)\""
else
  job_word="$job"
fi
tpu_ssh "$LOG_WORKER" "set -euo pipefail
$REMOTE_FUNCS
job=$job_word
log=$logs/\$job.log
pid=$logs/\$job.pid
[[ -f \"\$log\" ]] || { echo \"\$(hostname): no log \$log\" >&2; exit 1; }
if [[ -f \"\$pid\" ]] && alive \"\$(cat \"\$pid\")\"; then
  tail -n $(q "$LOG_LINES") -F --pid=\"\$(cat \"\$pid\")\" \"\$log\"
else
  tail -n $(q "$LOG_LINES") \"\$log\"
fi
echo \"(\$job is not running)\""
