# shellcheck shell=bash disable=SC2034 source-path=SCRIPTDIR
# Settings (environment variables; export them before calling a script, or prefix the call):
#
#   PROJECT           GCP project                                   default: gcloud's configured project
#   ZONE              zone holding your TPU quota                   default: us-west4-a
#   TPU_NAME          name of the TPU VM slice                      default: qzoom-$USER
#   ACCELERATOR_TYPE  slice type: v5litepod-16, v5p-32, v6e-16, v4-32 ...   default: v5litepod-16
#   RUNTIME_VERSION   TPU VM image                                  default: from ACCELERATOR_TYPE
#                     (v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e,
#                     otherwise tpu-ubuntu2204-base)
#   PROVISIONING      spot | reserved | on-demand                   default: spot
#   QUEUED            1: queued resource (waits for capacity); 0: plain tpu-vm create   default: 1
#   QR_ID             queued-resource id                            default: $TPU_NAME
#   QR_VALID_UNTIL    stop queueing after this long, e.g. 12h       default: unset (queue until served)
#   SERVICE_ACCOUNT   service account of the TPU VMs (cloud-platform scope); needs read/write on BUCKET
#                                                                   default: the Compute Engine default one
#   CREATE_FLAGS      extra create flags, e.g. "--network=NET --subnetwork=SUB"          default: none
#   CREATE_TIMEOUT    seconds create.sh waits for the slice, 0 = no limit                default: 0
#   POLL_SECONDS      seconds between state polls                   default: 30
#   ASSUME_YES        1: delete.sh does not ask for confirmation    default: 0
#   BUCKET            GCS bucket for runs (gs://BUCKET/runs/...)    default: none
#   RUNS              parent of the run directories                 default: gs://$BUCKET/runs
#   SOURCE            local: copy this checkout (tracked and untracked, not ignored, files);
#                     git: clone REPO_URL at REPO_REF on every worker                    default: local
#   REPO_URL          git URL for SOURCE=git                        default: none
#   REPO_REF          branch, tag or commit for SOURCE=git          default: main
#   REMOTE_DIR        package checkout on every worker (relative = under the home)       default: qzoom_jax
#   VENV              virtualenv on every worker (relative = under the home)             default: qzoom_venv
#   PYTHON_VERSION    Python of that virtualenv (jax 0.10 needs >= 3.11)                 default: 3.11
#   PIP_EXTRAS        extras installed with the package             default: tpu
#   LOG_DIR           job logs and pid files on every worker (relative = under the home) default: qzoom_logs
#   WORKERS           workers a command runs on: all, or one index such as 0            default: all
#   INTERNAL_IP       1: ssh/scp over internal IPs (from a VM in the same VPC)           default: 0
#   DRY_RUN           1: print the gcloud commands instead of running them               default: 0

: "${PROJECT:=}"
: "${ZONE:=us-west4-a}"
: "${TPU_NAME:=qzoom-${USER:-tpu}}"
: "${ACCELERATOR_TYPE:=v5litepod-16}"
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi
: "${PROVISIONING:=spot}"
: "${QUEUED:=1}"
: "${QR_ID:=$TPU_NAME}"
: "${QR_VALID_UNTIL:=}"
: "${SERVICE_ACCOUNT:=}"
: "${CREATE_FLAGS:=}"
: "${CREATE_TIMEOUT:=0}"
: "${POLL_SECONDS:=30}"
: "${ASSUME_YES:=0}"
: "${BUCKET:=}"
: "${RUNS:=${BUCKET:+gs://$BUCKET/runs}}"
: "${SOURCE:=local}"
: "${REPO_URL:=}"
: "${REPO_REF:=main}"
: "${REMOTE_DIR:=qzoom_jax}"
: "${VENV:=qzoom_venv}"
: "${PYTHON_VERSION:=3.11}"
: "${PIP_EXTRAS:=tpu}"
: "${LOG_DIR:=qzoom_logs}"
: "${WORKERS:=all}"
: "${INTERNAL_IP:=0}"
: "${DRY_RUN:=0}"

LAUNCH_TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common.sh
source "$LAUNCH_TPU_DIR/../common.sh"
# Flags every gcloud compute tpus command takes.
GC_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  GC_FLAGS+=(--project="$PROJECT")
fi

# maybe_help SCRIPT ARGS...: print SCRIPT's header and the settings, and exit, when ARGS start with -h/--help.
maybe_help() {
  local script=$1
  shift
  case "${1:-}" in
    -h | --help)
      print_header "$script"
      echo
      print_header "$LAUNCH_TPU_DIR/env.sh"
      exit 0
      ;;
  esac
}

# A path on a worker as a shell word: absolute as it is, relative under the worker's $HOME.
rpath() {
  if [[ "$1" == /* ]]; then
    printf '%q' "$1"
  else
    # shellcheck disable=SC2016  # $HOME is expanded on the worker
    printf '"$HOME"/%q' "$1"
  fi
}

# Bash functions for the scripts run on the workers: alive PID (running: not gone, not a zombie waiting to be
# reaped) and group_alive PGID (some process of that group is running).
read -r -d '' REMOTE_FUNCS <<'EOF' || true
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ -n "$s" && "$s" != Z* ]]; }
group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { n++ } END { exit n == 0 }'; }
EOF

# Run gcloud, or print the command when DRY_RUN=1.
gcloud_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud%s\n' "$(printf ' %q' "$@")"
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud SDK (cloud.google.com/sdk)"
  gcloud "$@"
}

# Print the output of a read-only gcloud command, or nothing when it fails (e.g. the resource does not exist);
# with DRY_RUN=1 print nothing (the command goes to stderr).
gcloud_query() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud%s\n' "$(printf ' %q' "$@")" >&2
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud SDK (cloud.google.com/sdk)"
  gcloud "$@" 2>/dev/null || true
}

# tpu_ssh WORKER SCRIPT: run the bash SCRIPT on WORKER (all, or an index) of the slice.
tpu_ssh() {
  local args=(compute tpus tpu-vm ssh "$TPU_NAME" "${GC_FLAGS[@]}" --worker="$1" --command="bash -c $(q "$2")")
  if [[ "$INTERNAL_IP" == 1 ]]; then
    args+=(--internal-ip)
  fi
  gcloud_run "${args[@]}"
}

# tpu_scp LOCAL_FILE REMOTE_NAME: copy a file into the home directory of WORKERS.
tpu_scp() {
  local args=(compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${GC_FLAGS[@]}" --worker="$WORKERS")
  if [[ "$INTERNAL_IP" == 1 ]]; then
    args+=(--internal-ip)
  fi
  gcloud_run "${args[@]}"
}
