#!/usr/bin/env bash
# Run a shell command on every worker of the slice.
#
# Usage: launch/tpu/ssh.sh COMMAND...
#
# The words of COMMAND are joined with spaces and run by bash in the worker's home directory on workers
# WORKERS (default all), like ssh does. Examples:
#   launch/tpu/ssh.sh 'tail -n 3 qzoom_logs/*.log'
#   WORKERS=0 launch/tpu/ssh.sh gcloud storage cp -r /tmp/qzoom/export/qzoom-7b gs://my-bucket/export/
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -ge 1 ]] || die "usage: launch/tpu/ssh.sh COMMAND... (see --help)"
tpu_ssh "$WORKERS" "$*"
