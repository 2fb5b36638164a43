#!/usr/bin/env bash
# Submit a qzoom_jax run to a GKE cluster with a TPU slice node pool, as the JobSet in launch/gke/jobset.yaml.
#
# Usage: launch/gke/submit.sh MODULE [FLAGS...]
#
#   MODULE   train | labels | ...   (every pod runs python -m qzoom_jax.MODULE FLAGS...)
#
# Fills in jobset.yaml from the settings below and runs kubectl apply -f - (DRY_RUN=1 prints the YAML
# instead). When FLAGS hold --config=FILE[:preset] and no --workdir, adds --workdir=$WORKDIR, by default
# gs://$BUCKET/runs/NAME with NAME the config's run name (configs/sdrpn.py:qwen2_5vl_7b -> sdrpn_qwen2_5vl_7b).
# The bucket is mounted read-only at /gcs in every pod: pass model and data paths under /gcs.
#
# Needs: kubectl pointing at the cluster (gcloud container clusters get-credentials ...), the JobSet
# controller and the Cloud Storage FUSE CSI driver on the cluster, a TPU node pool of TPU_TOPOLOGY, and IMAGE
# built and pushed by launch/gke/build.sh. Watch, resume and tear down:
#   kubectl get jobset JOBSET_NAME; kubectl logs -f JOBSET_NAME-slice-0-0-<suffix> (kubectl get pods)
#   kubectl delete jobset JOBSET_NAME   (then submit again with the same arguments to resume)
#
# Settings (environment variables):
#   IMAGE                container image with the package (launch/gke/build.sh)   required
#   BUCKET               GCS bucket, mounted at /gcs; runs go to gs://BUCKET/runs   required
#   RUNS                 parent of the run directories            default: gs://$BUCKET/runs
#   WORKDIR              run directory added as --workdir          default: $RUNS/NAME
#   JOBSET_NAME          JobSet name (short: pod names add ~10 characters)   default: qzoom-NAME, '_' -> '-'
#   TPU_ACCELERATOR      node label gke-tpu-accelerator            default: tpu-v5-lite-podslice
#                        (v5p: tpu-v5p-slice, v6e: tpu-v6e-slice)
#   TPU_TOPOLOGY         node label gke-tpu-topology               default: 4x4 (v5e: 16 chips, 4 hosts)
#   CHIPS_PER_HOST       TPU chips per VM host                      default: 4
#   NUM_HOSTS            pods = hosts in the slice                 default: chips in TPU_TOPOLOGY / CHIPS_PER_HOST
#   K8S_SERVICE_ACCOUNT  Kubernetes service account of the pods    default: default
#   NAMESPACE            Kubernetes namespace                       default: default
#   MAX_RESTARTS         JobSet restarts after a failure or preemption   default: 10
#   DRY_RUN              1: print the rendered YAML, apply nothing  default: 0
set -euo pipefail
GKE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$GKE_DIR/../common.sh"
case "${1:-}" in
  -h | --help)
    print_header "${BASH_SOURCE[0]}"
    exit 0
    ;;
esac
[[ $# -ge 1 ]] || die "usage: launch/gke/submit.sh MODULE [FLAGS...] (see --help)"
: "${IMAGE:=}"
: "${BUCKET:=}"
: "${RUNS:=${BUCKET:+gs://$BUCKET/runs}}"
: "${WORKDIR:=}"
: "${JOBSET_NAME:=}"
: "${TPU_ACCELERATOR:=tpu-v5-lite-podslice}"
: "${TPU_TOPOLOGY:=4x4}"
: "${CHIPS_PER_HOST:=4}"
: "${NUM_HOSTS:=}"
: "${K8S_SERVICE_ACCOUNT:=default}"
: "${NAMESPACE:=default}"
: "${MAX_RESTARTS:=10}"
: "${DRY_RUN:=0}"

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
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR=$WORKDIR: the pods share no disk; use a gs:// run directory"
  flags+=("--workdir=$WORKDIR")
fi
[[ -n "$IMAGE" ]] || die "set IMAGE (build and push it with launch/gke/build.sh)"
[[ -n "$BUCKET" ]] || die "set BUCKET (mounted at /gcs in every pod)"
[[ "$TPU_TOPOLOGY" =~ ^[0-9]+(x[0-9]+)*$ ]] || die "TPU_TOPOLOGY=$TPU_TOPOLOGY is not like 4x4 or 2x2x2"
[[ "$CHIPS_PER_HOST" =~ ^[1-9][0-9]*$ ]] || die "CHIPS_PER_HOST=$CHIPS_PER_HOST is not a positive number"
if [[ -z "$NUM_HOSTS" ]]; then
  chips=$((${TPU_TOPOLOGY//x/*}))
  ((chips % CHIPS_PER_HOST == 0)) || die "$chips chips ($TPU_TOPOLOGY) do not fill hosts of $CHIPS_PER_HOST"
  NUM_HOSTS=$((chips / CHIPS_PER_HOST))
fi
[[ "$NUM_HOSTS" =~ ^[1-9][0-9]*$ ]] || die "NUM_HOSTS=$NUM_HOSTS is not a positive number"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS is not a number"
if [[ -z "$JOBSET_NAME" ]]; then
  JOBSET_NAME="qzoom-${RUN_NAME:-$module}"
  JOBSET_NAME="${JOBSET_NAME//_/-}"
  JOBSET_NAME="${JOBSET_NAME:0:40}"
  JOBSET_NAME="${JOBSET_NAME%-}"
fi
[[ "$JOBSET_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#JOBSET_NAME} -le 40 ]] ||
  die "JOBSET_NAME=$JOBSET_NAME: use at most 40 lower-case letters, digits and '-'"

# The container args as a YAML flow sequence of double-quoted (JSON-escaped) strings.
args_yaml=""
bs="\\"
dq='"'
for flag in "${flags[@]}"; do
  flag="${flag//"$bs"/"$bs$bs"}"
  flag="${flag//"$dq"/"$bs$dq"}"
  args_yaml+="${args_yaml:+, }\"$flag\""
done
args_yaml="[$args_yaml]"

manifest="$(<"$GKE_DIR/jobset.yaml")"
for var in JOBSET_NAME MAX_RESTARTS NUM_HOSTS K8S_SERVICE_ACCOUNT TPU_ACCELERATOR TPU_TOPOLOGY IMAGE MODULE ARGS \
  CHIPS_PER_HOST BUCKET; do
  case "$var" in
    MODULE) value="$module" ;;
    ARGS) value="$args_yaml" ;;
    *) value="${!var}" ;;
  esac
  manifest="${manifest//"\${$var}"/"$value"}"
done

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s\n' "$manifest"
  exit 0
fi
command -v kubectl >/dev/null 2>&1 || die "kubectl not found (gcloud components install kubectl)"
log "submitting JobSet $JOBSET_NAME: $NUM_HOSTS x $TPU_ACCELERATOR ($TPU_TOPOLOGY), python -m qzoom_jax.$module ${flags[*]}"
printf '%s\n' "$manifest" | kubectl apply --namespace="$NAMESPACE" -f -
log "watch: kubectl get pods --namespace=$NAMESPACE -l jobset.sigs.k8s.io/jobset-name=$JOBSET_NAME"
log "logs:  kubectl logs --namespace=$NAMESPACE -f -l jobset.sigs.k8s.io/jobset-name=$JOBSET_NAME,batch.kubernetes.io/job-completion-index=0"
log "stop:  kubectl delete jobset --namespace=$NAMESPACE $JOBSET_NAME"
