#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a TPU VM or pod slice through a queued resource and wait until it is ACTIVE.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE [options]

Requests a TPU VM / pod slice as a queued resource (queued resource and node share NAME):
  gcloud compute tpus queued-resources create NAME --node-id NAME --zone ZONE
      --accelerator-type TYPE --runtime-version VERSION [--spot | --reserved] [--project P]
then polls its state until ACTIVE. Fails (exit 1) when it becomes FAILED or SUSPENDED, or
when --timeout passes first (the request then stays queued; teardown.sh removes it).

Options:
$COMMON_HELP
  --accelerator-type TYPE
                       e.g. v4-8, v5litepod-8, v5p-16, v6e-16 (env TPU_ACCELERATOR_TYPE)
  --runtime-version V  TPU VM image (env TPU_RUNTIME_VERSION); default by type:
                       v2/v3/v4: tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite,
                       v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
  --spot               Spot capacity: cheaper, can be preempted at any time
  --reserved           use the project's reservation
                       (neither --spot nor --reserved: on-demand)
  --timeout SECONDS    give up waiting for ACTIVE after this long (default 3600; 0: no limit)
  --poll-interval SECONDS
                       seconds between state polls (default 30)
  --no-wait            return right after the create request

Example:
  $PROG --name my-tpu --zone us-east5-b --accelerator-type v6e-16 --spot
EOF
}

ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
SPOT=0
RESERVED=0
TIMEOUT=3600
POLL_INTERVAL=30
WAIT=1

while (($#)); do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    *) parse_other_arg 0 "$@"; shift "$CONSUMED" ;;
  esac
done

check_common
[[ -n $ACCELERATOR_TYPE ]] || die_usage "--accelerator-type is required (or set TPU_ACCELERATOR_TYPE)"
check_accelerator_type "$ACCELERATOR_TYPE"
if ((SPOT && RESERVED)); then
  die_usage "--spot and --reserved are mutually exclusive"
fi
check_uint --timeout "$TIMEOUT"
check_uint --poll-interval "$POLL_INTERVAL"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
  [[ -n $RUNTIME_VERSION ]] ||
    die_usage "no default runtime version for $ACCELERATOR_TYPE; pass --runtime-version"
fi
[[ $RUNTIME_VERSION =~ ^[a-z0-9][-a-z0-9._]*$ ]] ||
  die_usage "invalid --runtime-version '$RUNTIME_VERSION'"

create=(gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE"
  --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION")
if ((SPOT)); then
  create+=(--spot)
elif ((RESERVED)); then
  create+=(--reserved)
fi
if [[ -n $PROJECT ]]; then
  create+=(--project "$PROJECT")
fi

run_cmd "${create[@]}"
if ((!WAIT)); then
  exit 0
fi
if ((DRY_RUN)); then
  qr_describe_cmd
  show_cmd "${QR_DESCRIBE[@]}"
  log "(dry run: the describe command repeats every ${POLL_INTERVAL}s until the state is ACTIVE)"
  exit 0
fi
wait_active "$TIMEOUT" "$POLL_INTERVAL" || exit 1
log "$NAME is ACTIVE ($ACCELERATOR_TYPE in $ZONE)"
