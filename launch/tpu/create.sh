#!/usr/bin/env bash
# Create or queue the Cloud TPU VM slice TPU_NAME, and wait until it is ready.
#
# Usage: launch/tpu/create.sh
#
# QUEUED=1 (default): files the queued resource QR_ID (gcloud compute tpus queued-resources create, with
# --spot or --reserved from PROVISIONING, --valid-until-duration from QR_VALID_UNTIL) and polls it every
# POLL_SECONDS until it is ACTIVE. QUEUED=0: gcloud compute tpus tpu-vm create, which fails at once when
# there is no capacity, then waits until the node is READY.
#
# Safe to run again: a slice that is ready is left alone, one still queued is waited for, and a queued
# resource that FAILED or was SUSPENDED (a spot slice that was preempted) is deleted and filed anew. After a
# preemption, `create.sh && setup.sh && run.sh <the same arguments>` resumes the run from its last checkpoint.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -eq 0 ]] || die "create.sh takes no arguments; settings are environment variables (see --help)"

case "$PROVISIONING" in
  spot) prov_flags=(--spot) ;;
  reserved) prov_flags=(--reserved) ;;
  on-demand) prov_flags=() ;;
  *) die "PROVISIONING=$PROVISIONING: choose spot, reserved or on-demand" ;;
esac
read -r -a extra_flags <<<"$CREATE_FLAGS"
vm_flags=(--scopes=https://www.googleapis.com/auth/cloud-platform)
if [[ -n "$SERVICE_ACCOUNT" ]]; then
  vm_flags+=(--service-account="$SERVICE_ACCOUNT")
fi

qr_state() { gcloud_query compute tpus queued-resources describe "$QR_ID" "${GC_FLAGS[@]}" --format='value(state.state)'; }
node_state() { gcloud_query compute tpus tpu-vm describe "$TPU_NAME" "${GC_FLAGS[@]}" --format='value(state)'; }

# wait_until STATE_FUNCTION GOOD BAD_REGEX: poll until the state is GOOD; die on a state matching BAD_REGEX.
wait_until() {
  local state_fn=$1 good=$2 bad=$3 start=$SECONDS state
  if [[ "$DRY_RUN" == 1 ]]; then
    log "(dry run) would wait until $state_fn is $good"
    return 0
  fi
  while true; do
    state="$($state_fn)"
    if [[ "$state" == "$good" ]]; then
      return 0
    fi
    if [[ -n "$state" && "$state" =~ ^($bad)$ ]]; then
      die "$TPU_NAME is $state; see: gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE"
    fi
    if ((CREATE_TIMEOUT > 0 && SECONDS - start > CREATE_TIMEOUT)); then
      die "$TPU_NAME not $good after ${CREATE_TIMEOUT}s (state: ${state:-unknown})"
    fi
    log "$TPU_NAME: ${state:-not visible yet}; next check in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

if [[ "$QUEUED" == 1 ]]; then
  state="$(qr_state)"
  if [[ "$state" == FAILED || "$state" == SUSPENDED ]]; then
    log "queued resource $QR_ID is $state: deleting it and queueing again"
    gcloud_run compute tpus queued-resources delete "$QR_ID" "${GC_FLAGS[@]}" --force --quiet
    state=""
  fi
  if [[ -z "$state" ]]; then
    args=(compute tpus queued-resources create "$QR_ID" "${GC_FLAGS[@]}" --node-id="$TPU_NAME"
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${prov_flags[@]}" "${vm_flags[@]}")
    if [[ -n "$QR_VALID_UNTIL" ]]; then
      args+=(--valid-until-duration="$QR_VALID_UNTIL")
    fi
    log "queueing $ACCELERATOR_TYPE ($PROVISIONING) as $QR_ID in $ZONE"
    gcloud_run "${args[@]}" "${extra_flags[@]}"
  else
    log "queued resource $QR_ID exists ($state)"
  fi
  wait_until qr_state ACTIVE 'FAILED|SUSPENDED|SUSPENDING|DELETING'
else
  state="$(node_state)"
  if [[ -z "$state" ]]; then
    log "creating $ACCELERATOR_TYPE ($PROVISIONING) $TPU_NAME in $ZONE"
    gcloud_run compute tpus tpu-vm create "$TPU_NAME" "${GC_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${prov_flags[@]}" "${vm_flags[@]}" "${extra_flags[@]}"
  else
    log "$TPU_NAME exists ($state)"
  fi
  wait_until node_state READY 'PREEMPTED|TERMINATED|STOPPED|DELETING'
fi
if [[ "$DRY_RUN" != 1 ]]; then
  log "$TPU_NAME is ready; next: launch/tpu/setup.sh"
fi
