#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete a queued resource together with its TPU node.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

Deletes the queued resource NAME and its TPU node (whatever state it is in):
  gcloud compute tpus queued-resources delete NAME --zone ZONE --force --quiet [--project P]
Files on the workers are lost; the run directory on gs:// is kept.

Options:
$COMMON_HELP
  --async              return without waiting for the deletion to finish

Example:
  $PROG --name my-tpu --zone us-east5-b
EOF
}

ASYNC=0
while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --async) ASYNC=1; shift ;;
    *) parse_other_arg 0 "$@"; shift "$CONSUMED" ;;
  esac
done
check_common

delete=(gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet)
if ((ASYNC)); then
  delete+=(--async)
fi
if [[ -n $PROJECT ]]; then
  delete+=(--project "$PROJECT")
fi
run_cmd "${delete[@]}"
