#!/usr/bin/env bash
# Install the package on every worker of the slice.
#
# Usage: launch/tpu/setup.sh
#
# 1. Puts the source on every worker in REMOTE_DIR: SOURCE=local (default) packs this checkout (the files git
#    tracks plus untracked files it does not ignore, so uncommitted edits go too) and copies it with
#    gcloud compute tpus tpu-vm scp --worker=all; SOURCE=git clones REPO_URL at REPO_REF instead.
# 2. Creates the virtualenv VENV with Python PYTHON_VERSION (via uv, which fetches that Python when the image
#    lacks it: the TPU images ship 3.10, jax 0.10 needs 3.11+) and runs pip install -e "REMOTE_DIR[PIP_EXTRAS]".
# 3. Checks the install: every worker imports qzoom_jax, calls jax.distributed.initialize() (which finds the
#    slice through the TPU metadata server) and prints its process index and device counts.
#
# Run it again after changing the code; it replaces REMOTE_DIR and keeps the virtualenv. CHECK=0 skips step 3.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
maybe_help "${BASH_SOURCE[0]}" "$@"
[[ $# -eq 0 ]] || die "setup.sh takes no arguments; settings are environment variables (see --help)"
: "${CHECK:=1}"

dir="$(rpath "$REMOTE_DIR")"
venv="$(rpath "$VENV")"
case "$SOURCE" in
  local)
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO_ROOT is not a git checkout; use SOURCE=git"
    (
      cd "$REPO_ROOT"
      git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
        if [[ -e "$file" ]]; then
          printf '%s\0' "$file"
        fi
      done | tar --null -T - -czf "$tmp/qzoom_src.tgz"
    )
    log "packed $REPO_ROOT ($(du -h "$tmp/qzoom_src.tgz" | cut -f1)); copying it to workers $WORKERS of $TPU_NAME"
    tpu_scp "$tmp/qzoom_src.tgz" qzoom_src.tgz
    # shellcheck disable=SC2016  # expanded on the worker
    fetch="rm -rf $dir.new && mkdir -p $dir.new && tar -xzf \"\$HOME\"/qzoom_src.tgz -C $dir.new
rm -rf $dir && mv $dir.new $dir && rm -f \"\$HOME\"/qzoom_src.tgz"
    ;;
  git)
    [[ -n "$REPO_URL" ]] || die "SOURCE=git needs REPO_URL"
    fetch="if [[ ! -d $dir/.git ]]; then rm -rf $dir && git clone --quiet $(q "$REPO_URL") $dir; fi
git -C $dir fetch --quiet origin $(q "$REPO_REF") && git -C $dir checkout --quiet --force FETCH_HEAD"
    ;;
  *) die "SOURCE=$SOURCE: choose local or git" ;;
esac

extras=""
if [[ -n "$PIP_EXTRAS" ]]; then
  extras="$(q "[$PIP_EXTRAS]")"
fi
check=""
if [[ "$CHECK" == 1 ]]; then
  check="$venv/bin/python -c $(q 'import jax, qzoom_jax
jax.distributed.initialize()
print(f"worker {jax.process_index()}/{jax.process_count()}: jax {jax.__version__},",
      f"{jax.local_device_count()} local / {jax.device_count()} global {jax.devices()[0].platform} devices")')"
fi

log "installing on workers $WORKERS of $TPU_NAME (Python $PYTHON_VERSION, extras [$PIP_EXTRAS])"
tpu_ssh "$WORKERS" "set -euo pipefail
$fetch
export PATH=\"\$HOME/.local/bin:\$PATH\"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if [[ ! -x $venv/bin/python ]]; then uv venv --quiet --python $(q "$PYTHON_VERSION") $venv; fi
uv pip install --quiet --python $venv/bin/python -e $dir$extras
$check"
log "installed; next: launch/tpu/stage.sh (model weights, data), then launch/tpu/run.sh"
