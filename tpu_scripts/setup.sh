#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy jaxlora to every worker of a TPU VM / pod slice and install it there.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Puts the project into ~/$REMOTE_DIR on every worker and installs it with pip
(python3 -m pip install -e '.[cli,gcs]' 'jax[tpu]'), all workers at once (--worker=all).
By default it ships a tarball of a commit of this checkout (git archive REF; uncommitted
changes are not included) with 'gcloud compute tpus tpu-vm scp'; with --git-url every
worker clones (or fetches) the repository itself instead.

Options:
$COMMON_HELP
  --git-url URL        clone URL on the workers instead of copying this checkout
  --ref REF            commit, tag or branch to install (default: HEAD of this checkout;
                       with --git-url: origin/HEAD, i.e. the default branch; use origin/BRANCH)
  --jax-spec SPEC      pip requirement for JAX on the workers (default 'jax[tpu]';
                       pin it, e.g. 'jax[tpu]==0.6.2')
  --post-command CMD   shell command run on every worker in ~/$REMOTE_DIR after the install,
                       e.g. to fetch the model and data:
                       'mkdir -p checkpoints && gcloud storage cp -r gs://b/llama3 checkpoints/'

Example:
  $PROG --name my-tpu --zone us-east5-b --post-command 'gcloud storage cp -r gs://b/data .'
EOF
}

GIT_URL=''
REF=''
JAX_SPEC='jax[tpu]'
POST_COMMAND=''
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --git-url) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --jax-spec) need_value "$@"; JAX_SPEC=$2; shift 2 ;;
    --post-command) need_value "$@"; POST_COMMAND=$2; shift 2 ;;
    *) parse_other_arg 0 "$@"; shift "$CONSUMED" ;;
  esac
done
check_common
[[ $JAX_SPEC =~ ^[A-Za-z0-9][][A-Za-z0-9_.,:/=\<\>!~+-]*$ ]] ||
  die_usage "invalid --jax-spec '$JAX_SPEC': expected a pip requirement such as 'jax[tpu]==0.6.2'"

install="python3 -m pip install -e \".[cli,gcs]\" \"$JAX_SPEC\""
if [[ -n $POST_COMMAND ]]; then
  install+="; $POST_COMMAND"
fi

if [[ -n $GIT_URL ]]; then
  [[ $GIT_URL =~ ^(https://|http://|ssh://|git@|git://|file://) ]] ||
    die_usage "invalid --git-url '$GIT_URL': expected an https://, ssh:// or git@ URL"
  REF=${REF:-origin/HEAD}
  url=$(quote_word "$GIT_URL")
  ref=$(quote_word "$REF")
  remote="set -e; if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch --tags origin;"
  remote+=" else git clone $url ~/$REMOTE_DIR; fi; git -C ~/$REMOTE_DIR checkout --force --detach $ref;"
  remote+=" cd ~/$REMOTE_DIR; $install"
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command "$remote"
  exit 0
fi

REF=${REF:-HEAD}
git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
  die_usage "$REPO_ROOT is not a git checkout; use --git-url"
git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
  die_usage "--ref '$REF' is not a commit of this checkout"
if [[ $REF == HEAD && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  log "warning: uncommitted changes are not copied (the tarball holds HEAD)"
fi

tarball="${TMPDIR:-/tmp}/jaxlora-$NAME.tar.gz"
if ((!DRY_RUN)); then
  trap 'rm -f "$tarball"' EXIT
fi
run_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$REF"
run_cmd gcloud compute tpus tpu-vm scp --recurse "$tarball" "$NAME:$REMOTE_DIR.tar.gz" \
  "${SCOPE[@]}" --worker=all
remote="set -e; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR;"
remote+=" rm -f ~/$REMOTE_DIR.tar.gz; cd ~/$REMOTE_DIR; $install"
run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command "$remote"
