# shellcheck shell=bash disable=SC2034  # RUN_* are outputs for the sourcing script
# Helpers shared by the launch scripts (sourced by launch/tpu/env.sh and launch/gke/submit.sh).

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"

log() { printf '[qzoom launch] %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# The leading comment block of a file (after a #! or shellcheck line), without the "# ".
print_header() {
  awk 'NR == 1 && /^#!|^# shellcheck/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# Shell-quote each argument, for a command line that another bash parses.
q() {
  local out='' arg
  for arg in "$@"; do
    out+="$(printf '%q' "$arg") "
  done
  printf '%s' "${out% }"
}

# check_module MODULE: die unless python -m qzoom_jax.MODULE exists in this checkout.
check_module() {
  [[ "$1" =~ ^[a-z_]+$ && -f "$REPO_ROOT/qzoom_jax/$1.py" ]] ||
    die "no entry point qzoom_jax.$1 (no $REPO_ROOT/qzoom_jax/$1.py); try train, labels or evaluate"
}

# parse_run_flags FLAGS...: what the entry point's flags say about the run. Sets RUN_CONFIG (the value of
# --config, FILE[:preset], or empty), RUN_NAME (the run name the config gives, as the package does:
# configs/sdrpn.py:qwen2_5vl_7b -> sdrpn_qwen2_5vl_7b, configs/sdrpn.py -> sdrpn; empty without --config) and
# RUN_HAS_WORKDIR (1 when FLAGS hold --workdir). Dies when the config file is not in this checkout.
parse_run_flags() {
  local flags=("$@") i file
  RUN_CONFIG=""
  RUN_NAME=""
  RUN_HAS_WORKDIR=0
  for ((i = 0; i < ${#flags[@]}; i++)); do
    case "${flags[i]}" in
      --config=*) RUN_CONFIG="${flags[i]#--config=}" ;;
      --config) RUN_CONFIG="${flags[i + 1]:-}" ;;
      --workdir | --workdir=*) RUN_HAS_WORKDIR=1 ;;
    esac
  done
  if [[ -n "$RUN_CONFIG" ]]; then
    file="${RUN_CONFIG%%:*}"
    if [[ "$file" != /* && ! -f "$REPO_ROOT/$file" ]]; then
      die "config file $file not found in $REPO_ROOT (the job runs in a copy of this checkout)"
    fi
    RUN_NAME="$(basename "$file" .py)"
    if [[ "$RUN_CONFIG" == *:* && -n "${RUN_CONFIG#*:}" ]]; then
      RUN_NAME="${RUN_NAME}_${RUN_CONFIG#*:}"
    fi
  fi
}
