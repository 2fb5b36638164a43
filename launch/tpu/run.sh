#!/usr/bin/env bash
# Run a qzoom_jax entry point on every worker of the slice, detached, and follow its log.
#
# Usage: launch/tpu/run.sh MODULE [FLAGS...]
#
#   MODULE   train | labels | evaluate | infer | bench | convert   (runs python -m qzoom_jax.MODULE FLAGS...)
#
# Every worker (WORKERS, default all) starts the same command in REMOTE_DIR with the VENV's Python, in its own
# session (setsid), so it survives the ssh connection; the package calls jax.distributed.initialize(), which
# finds the other workers through the TPU metadata server. Output goes to LOG_DIR/JOB.log on each worker
# (appended, with a start and an exit line), the process id to LOG_DIR/JOB.pid. A job already running
# under the same name is refused; stop it with launch/tpu/stop.sh.
#
# When FLAGS hold --config=FILE[:preset] and no --workdir, run.sh adds --workdir=$WORKDIR, by default
# $RUNS/NAME where NAME is the run name the config gives (configs/sdrpn.py:qwen2_5vl_7b -> sdrpn_qwen2_5vl_7b),
# e.g. gs://BUCKET/runs/sdrpn_qwen2_5vl_7b. Checkpoints and metrics go there; running the same command again
# (after stop.sh, or on a new slice after a preemption) resumes from the latest checkpoint in it.
#
# More settings:
#   JOB       job name for the log and pid files        default: the run name, or MODULE
#   WORKDIR   run directory added as --workdir          default: $RUNS/NAME
#   JOB_ENV   "KEY=VALUE ..." added to the job's environment, e.g. "JAX_PLATFORMS=cpu"   default: none
#   FOLLOW    1: stream worker 0's log once started (Ctrl-C stops following, not the job)  default: 1
#
# Examples:
#   BUCKET=my-bucket launch/tpu/run.sh train --config=configs/sdrpn.py --config.train.global_batch_size=32
#   BUCKET=my-bucket launch/tpu/run.sh train --config=configs/sdrpn.py:qwen2_5vl_7b \
#       --config.model.path=/tmp/qzoom/models/Qwen2.5-VL-7B-Instruct \
#       --config.data.pickle=/tmp/qzoom/data/stage1/qwen2_5vl_pseudo_7b_576res_185k.pkl
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -ge 1 ]] || die "usage: launch/tpu/run.sh MODULE [FLAGS...] (see --help)"
: "${JOB:=}"
: "${WORKDIR:=}"
: "${JOB_ENV:=}"
: "${FOLLOW:=1}"

module=${1#qzoom_jax.}
shift
check_module "$module"
flags=("$@")
parse_run_flags "${flags[@]}"
if [[ -n "$RUN_CONFIG" && "$RUN_HAS_WORKDIR" == 0 ]]; then
  if [[ -z "$WORKDIR" ]]; then
    [[ -n "$RUNS" ]] || die "set BUCKET (runs go to gs://BUCKET/runs/NAME), RUNS or WORKDIR, or pass --workdir"
    WORKDIR="$RUNS/$RUN_NAME"
  fi
  flags+=("--workdir=$WORKDIR")
  if [[ "$WORKDIR" != gs://* && "$WORKERS" == all ]]; then
    log "warning: --workdir=$WORKDIR is not on GCS; every worker of a multi-host slice must see the same run directory"
  fi
fi
job="${JOB:-${RUN_NAME:-$module}}"
[[ "$job" =~ ^[A-Za-z0-9_.-]+$ ]] || die "JOB=$job: use letters, digits, '.', '_' and '-'"
read -r -a job_env <<<"$JOB_ENV"
for assignment in "${job_env[@]}"; do
  [[ "$assignment" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "JOB_ENV: '$assignment' is not KEY=VALUE"
done

logs="$(rpath "$LOG_DIR")"
venv="$(rpath "$VENV")"
command=(python -m "qzoom_jax.$module" "${flags[@]}")
# What each worker's session runs: record its pid (= its process group), run the job, log how it ended.
job_script="echo \$\$ > $logs/$job.pid
export PATH=$venv/bin:\"\$PATH\" PYTHONUNBUFFERED=1
env $(q "${job_env[@]}" "${command[@]}")
rc=\$?
echo \"[qzoom launch] \$(date -u +%FT%TZ) \$(hostname): exit \$rc\"
exit \$rc"

log "starting on workers $WORKERS of $TPU_NAME as job $job: ${command[*]}"
tpu_ssh "$WORKERS" "set -euo pipefail
$REMOTE_FUNCS
mkdir -p $logs
if [[ -f $logs/$job.pid ]] && alive \"\$(cat $logs/$job.pid)\"; then
  echo \"\$(hostname): job $job is already running (pid \$(cat $logs/$job.pid)); stop it with launch/tpu/stop.sh $job\" >&2
  exit 1
fi
[[ -x $venv/bin/python ]] || { echo \"\$(hostname): no $venv; run launch/tpu/setup.sh first\" >&2; exit 1; }
cd $(rpath "$REMOTE_DIR")
echo \"[qzoom launch] \$(date -u +%FT%TZ) \$(hostname): start\" $(q "${command[*]}") >> $logs/$job.log
echo $job > $logs/latest
setsid bash -c $(q "$job_script") >> $logs/$job.log 2>&1 < /dev/null &
echo \"\$(hostname): started $job, log $LOG_DIR/$job.log\""

if [[ "$FOLLOW" == 1 && "$DRY_RUN" != 1 ]]; then
  sleep 5
  exec "$LAUNCH_TPU_DIR/logs.sh" "$job"
fi
log "follow the log with: launch/tpu/logs.sh $job"
