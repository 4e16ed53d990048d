#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keep a training run going on a (Spot) TPU slice: recreate the slice when it is preempted and
# rerun the training command, which resumes from the checkpoint in its gs:// run directory.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

# `jaxlora train`'s exit status after SIGTERM/SIGINT: it finished the step in flight and wrote a
# checkpoint (EX_TEMPFAIL); rerunning the same command resumes from it.
EXIT_RESUME=75

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG
                  --bucket BUCKET --run-name RUN [options] [--] [section.key=value ...]

Loops until the training run finishes:
  1. makes sure the queued resource NAME is ACTIVE: creates it (create.sh) when it is
     missing; deletes and recreates it when it is FAILED or SUSPENDED (preempted); waits
     while it is queued or provisioning;
  2. installs the project (setup.sh) on a slice it (re)created, and once at the start
     unless --skip-setup;
  3. runs the training (run.sh). Exit status 0: done, exit 0. Exit status $EXIT_RESUME: the
     training stopped on SIGTERM/SIGINT (a preemption notice) after checkpointing, so it
     restarts from step 1 and the training resumes. Otherwise it checks the slice: when it
     is no longer ACTIVE (preempted) it restarts from step 1, and the training resumes from
     the latest checkpoint in gs://BUCKET/RUN. A failure on a healthy slice stops it with
     the training's exit status, unless --retry-errors.
At most --max-restarts restarts. The slice is left running at the end (teardown.sh).

Options:
$COMMON_HELP
 for create.sh:
  --accelerator-type TYPE
                       e.g. v5litepod-8, v6e-16 (env TPU_ACCELERATOR_TYPE)
  --runtime-version V  TPU VM image (env TPU_RUNTIME_VERSION; default from the type)
  --spot               Spot capacity (preemptible; what this script is for)
  --reserved           use the project's reservation (default: on-demand)
  --timeout SECONDS    wait at most this long for ACTIVE per attempt (default 3600; 0: no limit)
 for setup.sh:
  --git-url URL        workers clone URL instead of receiving this checkout
  --ref REF            commit, tag or branch to install
  --jax-spec SPEC      pip requirement for JAX (default 'jax[tpu]')
  --post-command CMD   shell command run on every worker after the install
  --skip-setup         do not install at the start when the slice already exists
 for run.sh:
  --config CONFIG      YAML preset, relative to the project on the workers
  --bucket BUCKET      gs:// bucket, optionally with a path (env TPU_BUCKET)
  --run-name RUN       run directory under the bucket; also names the log files
  --env KEY=VALUE      environment variable for the training processes (repeatable)
  --fetch-logs DIR     copy every worker's log into DIR after each attempt
  --                   everything after it is a config override (so is any key=value)
 own:
  --max-restarts N     give up after N restarts (default 10)
  --poll-interval SECONDS
                       seconds between state polls and before a restart (default 60)
  --retry-errors       also restart after a training failure on a healthy slice

Example:
  $PROG --name my-tpu --zone us-east5-b --accelerator-type v6e-16 --spot \\
      --config configs/llama3-8b-chat.yaml --bucket my-bucket --run-name llama-chat \\
      -- train.steps=2000
EOF
}

ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-}
CREATE_ARGS=()
SETUP_ARGS=()
RUN_ARGS=()
OVERRIDES=()
SKIP_SETUP=0
MAX_RESTARTS=10
POLL_INTERVAL=60
TIMEOUT=3600
RETRY_ERRORS=0
while (($#)); do
  case $1 in
    --) shift; OVERRIDES+=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$@"; CREATE_ARGS+=("$1" "$2"); shift 2 ;;
    --spot | --reserved) CREATE_ARGS+=("$1"); shift ;;
    --timeout) need_value "$@"; TIMEOUT=$2; shift 2 ;;
    --git-url | --ref | --jax-spec | --post-command)
      need_value "$@"; SETUP_ARGS+=("$1" "$2"); shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --config | --bucket | --run-name | --env | --fetch-logs)
      need_value "$@"; RUN_ARGS+=("$1" "$2"); shift 2 ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2; shift 2 ;;
    --retry-errors) RETRY_ERRORS=1; shift ;;
    *) parse_other_arg 1 "$@"; shift "$CONSUMED" ;;
  esac
done

check_common
[[ -n $ACCELERATOR_TYPE ]] || die_usage "--accelerator-type is required (or set TPU_ACCELERATOR_TYPE)"
check_uint --max-restarts "$MAX_RESTARTS"
check_uint --poll-interval "$POLL_INTERVAL"
check_uint --timeout "$TIMEOUT"

COMMON_ARGS=(--name "$NAME" --zone "$ZONE")
if [[ -n $PROJECT ]]; then
  COMMON_ARGS+=(--project "$PROJECT")
fi
CREATE_ARGS+=(--accelerator-type "$ACCELERATOR_TYPE" --timeout "$TIMEOUT"
  --poll-interval "$POLL_INTERVAL")
RUN_ARGS+=(-- ${OVERRIDES[@]+"${OVERRIDES[@]}"})

create() { "$SCRIPT_DIR/create.sh" "${COMMON_ARGS[@]}" "${CREATE_ARGS[@]}" "$@"; }
setup() { "$SCRIPT_DIR/setup.sh" "${COMMON_ARGS[@]}" ${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"} "$@"; }
train() { "$SCRIPT_DIR/run.sh" "${COMMON_ARGS[@]}" "$@" "${RUN_ARGS[@]}"; }
teardown() { "$SCRIPT_DIR/teardown.sh" "${COMMON_ARGS[@]}" "$@"; }

# Check every script's arguments before touching anything, reporting errors as our own.
for step in create setup train teardown; do
  rc=0
  err=$(TPU_SCRIPTS_PROG=$PROG "$step" --dry-run 2>&1 >/dev/null) || rc=$?
  if ((rc != 0)); then
    printf '%s\n' "$err" | grep -m1 'error:' >&2 || printf '%s\n' "$err" >&2
    exit "$rc"
  fi
done

if ((DRY_RUN)); then
  qr_describe_cmd
  show_cmd "${QR_DESCRIBE[@]}"
  log "(dry run) if $NAME is FAILED or SUSPENDED (preempted), it is deleted first:"
  teardown --dry-run
  log "(dry run) if it is missing (or was just deleted), it is created:"
  create --dry-run
  log "(dry run) on a slice it (re)created$( ((SKIP_SETUP)) || echo ', and at the start'):"
  setup --dry-run
  log "(dry run) every attempt:"
  train --dry-run
  log "(dry run) after a failure the state is checked again; a preempted slice is recreated" \
    "and the run resumes; exit status $EXIT_RESUME (stopped on a signal after checkpointing)" \
    "resumes too (at most $MAX_RESTARTS restarts, polls every ${POLL_INTERVAL}s)"
  exit 0
fi

NEW_SLICE=0
# Returns 0 once the slice is ACTIVE (NEW_SLICE=1 when it had to be created or waited for).
ensure_active() {
  local state unknown=0
  while true; do
    state=$(qr_state)
    case $state in
      ACTIVE) return 0 ;;
      NOT_FOUND)
        log "$NAME does not exist; creating it"
        NEW_SLICE=1
        create || return 1
        return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        log "$NAME is $state (preempted or failed); deleting it to create it again"
        teardown || return 1 ;;
      DELETING)
        sleep "$POLL_INTERVAL" ;;
      UNKNOWN)
        unknown=$((unknown + 1))
        ((unknown < 10)) || return 1
        sleep "$POLL_INTERVAL" ;;
      *)
        log "$NAME is $state; waiting for it to become ACTIVE"
        NEW_SLICE=1
        wait_active "$TIMEOUT" "$POLL_INTERVAL" || return 1
        return 0 ;;
    esac
  done
}

# After a failed step: stop unless the slice was preempted (or --retry-errors).
after_failure() {  # after_failure WHAT STATUS
  local state
  state=$(qr_state)
  if [[ $state == ACTIVE ]]; then  # a preemption can take a moment to show
    sleep "$POLL_INTERVAL"
    state=$(qr_state)
  fi
  if [[ $state == ACTIVE ]]; then
    if ((!RETRY_ERRORS)); then
      die "$1 failed with exit status $2 on a healthy slice; not retrying (--retry-errors would)" "$2"
    fi
    REASON="$1 failed with exit status $2"
  else
    REASON="$1 failed with exit status $2; $NAME is $state"
  fi
}

restarts=0
first=1
while true; do
  REASON=''
  if ensure_active; then
    rc=0
    if ((NEW_SLICE || (first && !SKIP_SETUP))); then
      setup || rc=$?
      if ((rc == 0)); then
        NEW_SLICE=0
      else
        after_failure setup "$rc"
      fi
    fi
    first=0
    if [[ -z $REASON ]]; then
      train || rc=$?
      if ((rc == 0)); then
        log "training finished (restarts: $restarts)"
        exit 0
      elif ((rc == EXIT_RESUME)); then  # not a failure: checkpointed on a signal, to resume
        REASON="training stopped on a signal after checkpointing (exit status $rc)"
      else
        after_failure training "$rc"
      fi
    fi
  else
    REASON="$NAME did not become ACTIVE"
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    die "giving up after $MAX_RESTARTS restarts ($REASON)"
  fi
  log "restart $restarts of at most $MAX_RESTARTS in ${POLL_INTERVAL}s ($REASON)"
  sleep "$POLL_INTERVAL"
done
