#!/usr/bin/env bash
# Build the container image of this checkout for launch/gke/jobset.yaml and push it.
#
# Usage: launch/gke/build.sh
#
# Runs, from the repository root,
#   docker build -f launch/gke/Dockerfile --build-arg EXTRAS=$EXTRAS -t $IMAGE .  &&  docker push $IMAGE
# The image holds the files of this checkout (uncommitted edits included; runs/ and .git excluded) installed
# with pip install -e ".[EXTRAS]". Push to Artifact Registry after
#   gcloud artifacts repositories create qzoom --repository-format=docker --location=REGION
#   gcloud auth configure-docker REGION-docker.pkg.dev
#
# Settings (environment variables):
#   IMAGE     image to build and push, e.g. us-docker.pkg.dev/PROJECT/qzoom/qzoom-jax:v1   required
#   EXTRAS    package extras: tpu, or gpu,gcs                    default: tpu
#   PUSH      0: build only                                      default: 1
#   DRY_RUN   1: print the docker commands, run nothing          default: 0
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
[[ $# -eq 0 ]] || die "build.sh takes no arguments; settings are environment variables (see --help)"
: "${IMAGE:=}"
: "${EXTRAS:=tpu}"
: "${PUSH:=1}"
: "${DRY_RUN:=0}"
[[ -n "$IMAGE" ]] || die "set IMAGE, e.g. IMAGE=us-docker.pkg.dev/PROJECT/qzoom/qzoom-jax:v1"

docker_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ docker%s\n' "$(printf ' %q' "$@")"
    return 0
  fi
  command -v docker >/dev/null 2>&1 || die "docker not found"
  docker "$@"
}

log "building $IMAGE (extras [$EXTRAS]) from $REPO_ROOT"
docker_run build -f "$GKE_DIR/Dockerfile" --build-arg EXTRAS="$EXTRAS" -t "$IMAGE" "$REPO_ROOT"
if [[ "$PUSH" == 1 ]]; then
  docker_run push "$IMAGE"
fi
log "next: IMAGE=$IMAGE BUCKET=... launch/gke/submit.sh train --config=..."
