#!/usr/bin/env bash
# Copy a GCS directory onto the local disk of every worker (model weights, data sets).
#
# Usage: launch/tpu/stage.sh gs://BUCKET/SRC_DIR DEST_DIR
#
# The frozen backbone (--config.model.path), the question pools and images (--config.data.jsonl,
# --config.data.image_root, --config.data.pickle) and the evaluation sets (--config.data_dir) are read as local
# paths, identically on every worker, so stage them before running. Runs
#   gcloud storage rsync --recursive gs://BUCKET/SRC_DIR DEST_DIR
# on workers WORKERS (default all) with the TPU VM's own service account, which needs read access to the
# bucket. rsync copies only what is missing, so running it again after a preemption is cheap. DEST_DIR should
# be absolute, e.g. /tmp/qzoom/models/Qwen2.5-VL-7B-Instruct (the boot disk holds about 100 GB; attach a data
# disk with CREATE_FLAGS="--data-disk=source=...,mode=read-only" for larger sets).
#
# Example:
#   launch/tpu/stage.sh gs://my-bucket/models/Qwen2.5-VL-7B-Instruct /tmp/qzoom/models/Qwen2.5-VL-7B-Instruct
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -eq 2 ]] || die "usage: launch/tpu/stage.sh gs://BUCKET/SRC_DIR DEST_DIR (see --help)"
src=$1
dest=$2
[[ "$src" == gs://* ]] || die "stage.sh copies from GCS: $src is not a gs:// path"

log "copying $src to $dest on workers $WORKERS of $TPU_NAME"
tpu_ssh "$WORKERS" "set -euo pipefail
mkdir -p $(rpath "$dest")
gcloud storage rsync --recursive $(q "$src") $(rpath "$dest")
echo \"\$(hostname): \$(du -sh $(rpath "$dest") | cut -f1) in $(q "$dest")\""
