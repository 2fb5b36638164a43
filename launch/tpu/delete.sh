#!/usr/bin/env bash
# Tear the slice down: delete the queued resource and its TPU VMs (or, with QUEUED=0, the TPU VM).
#
# Usage: launch/tpu/delete.sh
#
# Runs gcloud compute tpus queued-resources delete QR_ID --force (which deletes the TPU VMs it holds), or
# gcloud compute tpus tpu-vm delete TPU_NAME with QUEUED=0. gcloud asks for confirmation unless ASSUME_YES=1.
# The run directories on GCS are kept: a later create.sh, setup.sh, run.sh with the same arguments resumes.
# Billing stops once the VMs are gone; list what is left with
#   gcloud compute tpus queued-resources list --zone=ZONE; gcloud compute tpus tpu-vm list --zone=ZONE
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -eq 0 ]] || die "delete.sh takes no arguments; settings are environment variables (see --help)"

yes_flag=()
if [[ "$ASSUME_YES" == 1 ]]; then
  yes_flag=(--quiet)
fi
if [[ "$QUEUED" == 1 ]]; then
  log "deleting queued resource $QR_ID (and TPU VM $TPU_NAME) in $ZONE"
  gcloud_run compute tpus queued-resources delete "$QR_ID" "${GC_FLAGS[@]}" --force "${yes_flag[@]}"
else
  log "deleting TPU VM $TPU_NAME in $ZONE"
  gcloud_run compute tpus tpu-vm delete "$TPU_NAME" "${GC_FLAGS[@]}" "${yes_flag[@]}"
fi
log "deleted; the runs under ${RUNS:-your workdirs} are kept"
