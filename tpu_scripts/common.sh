# shellcheck shell=bash
# Helpers shared by the tpu_scripts launchers. Sourced, never run: each script sets
# `set -euo pipefail` itself and defines `usage` before parsing its arguments.
#
# Conventions:
#   exit 2  bad arguments (one line on stderr, `PROG: error: ...`)
#   exit 1  a runtime failure (gcloud failed, the slice FAILED, a timeout)
#   --dry-run prints every gcloud / ssh / git command as `+ cmd` on stdout and runs nothing;
#   in a real run the same line goes to stderr just before the command runs.

PROG=${TPU_SCRIPTS_PROG:-$(basename "$0")}

# Names of things on the workers (relative to the remote home directory).
# shellcheck disable=SC2034  # used by the scripts that source this file
REMOTE_DIR=jaxlora
# shellcheck disable=SC2034
REMOTE_LOG_DIR=jaxlora-logs

# Filled by parse_common_flag (every script) from flags or the environment.
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
DRY_RUN=0
CONSUMED=0

die_usage() {  # a usage error: one line, exit 2
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit 2
}

die() {  # a runtime failure: one line, exit ${2:-1}
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  exit "${2:-1}"
}

log() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# One word as the shell would need it typed: bare when that is safe, else single-quoted.
quote_word() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@,+%-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

quote_cmd() {  # the words of a command, quoted and joined with spaces
  local out='' word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

show_cmd() {  # `+ cmd` on stdout (what --dry-run prints)
  printf '+ %s\n' "$(quote_cmd "$@")"
}

run_cmd() {  # print the command; run it unless --dry-run
  if ((DRY_RUN)); then
    show_cmd "$@"
  else
    show_cmd "$@" >&2
    "$@"
  fi
}

# `need_value "$@"` inside an option loop: the option in $1 must be followed by a value.
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die_usage "option $1 needs a value"
  fi
}

# Handles the options every script shares. Sets CONSUMED to the number of words used;
# returns 1 when $1 is not one of them.
# shellcheck disable=SC2034  # CONSUMED is read by the caller
parse_common_flag() {
  case $1 in
    --name) need_value "$@"; NAME=$2; CONSUMED=2 ;;
    --zone) need_value "$@"; ZONE=$2; CONSUMED=2 ;;
    --project) need_value "$@"; PROJECT=$2; CONSUMED=2 ;;
    --dry-run) DRY_RUN=1; CONSUMED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# shellcheck disable=SC2034  # included in each script's usage text
COMMON_HELP="  --name NAME          TPU / queued-resource name (env TPU_NAME); lowercase letters,
                       digits and hyphens, starting with a letter
  --zone ZONE          zone, e.g. us-central2-b (env TPU_ZONE)
  --project PROJECT    Google Cloud project (env TPU_PROJECT; default: gcloud's configured one)
  --dry-run            print the commands (one per line, prefixed with '+ ') and run nothing
  -h, --help           show this help"

check_common() {  # --name and --zone are required and well-formed; --project if given
  [[ -n $NAME ]] || die_usage "--name is required (or set TPU_NAME)"
  [[ -n $ZONE ]] || die_usage "--zone is required (or set TPU_ZONE)"
  [[ ${#NAME} -le 63 && $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die_usage "invalid --name '$NAME': use lowercase letters, digits and hyphens, starting with a letter"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die_usage "invalid --zone '$ZONE': expected e.g. us-central2-b"
  if [[ -n $PROJECT && ! $PROJECT =~ ^[a-z][-a-z0-9:.]*[a-z0-9]$ ]]; then
    die_usage "invalid --project '$PROJECT'"
  fi
  # --zone ZONE [--project PROJECT], appended to every gcloud command.
  SCOPE=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE+=(--project "$PROJECT")
  fi
}

check_uint() {  # check_uint OPTION VALUE: a non-negative integer
  [[ $2 =~ ^[0-9]+$ ]] || die_usage "$1 must be a non-negative integer, got '$2'"
}

check_accelerator_type() {
  [[ $1 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die_usage "invalid --accelerator-type '$1': expected e.g. v4-8, v5litepod-8, v5p-16, v6e-16"
}

# The usual TPU VM image for an accelerator type; empty when there is no default.
default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo '' ;;
  esac
}

qr_describe_cmd() {
  QR_DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}"
    --format 'value(state.state)')
}

# Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...),
# NOT_FOUND when there is none, or UNKNOWN when gcloud failed otherwise (its error on stderr).
qr_state() {
  local out err rc=0
  qr_describe_cmd
  err=$(mktemp)
  out=$("${QR_DESCRIBE[@]}" 2>"$err") || rc=$?
  if ((rc == 0)) && [[ -n $out ]]; then
    printf '%s\n' "$out"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo NOT_FOUND
  else
    sed "s/^/$PROG: gcloud: /" "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# Polls until the queued resource is ACTIVE. Returns 1 with a message when it is FAILED,
# SUSPENDED (preempted), gone, or still not ACTIVE after TIMEOUT seconds (0: no limit).
wait_active() {  # wait_active TIMEOUT POLL_INTERVAL
  local timeout=$1 interval=$2 start=$SECONDS state last=''
  while true; do
    state=$(qr_state)
    if [[ $state != "$last" ]]; then
      log "queued resource $NAME: $state"
      last=$state
    fi
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        log "error: queued resource $NAME is $state; delete it with teardown.sh and create it again"
        return 1 ;;
      NOT_FOUND | DELETING)
        log "error: queued resource $NAME does not exist (any more)"
        return 1 ;;
    esac
    if ((timeout > 0 && SECONDS - start >= timeout)); then
      log "error: queued resource $NAME is still $state after ${timeout}s; it stays queued (teardown.sh removes it)"
      return 1
    fi
    sleep "$interval"
  done
}

# An argument no script-specific case matched: a common flag, else an unknown option (usage
# error), else a positional config override where the script takes them ($1 = 1).
# Sets CONSUMED to the number of arguments used.
# shellcheck disable=SC2034  # CONSUMED is read by the caller
parse_other_arg() {
  local allow_positional=$1
  shift
  if parse_common_flag "$@"; then
    return 0
  fi
  if [[ $1 == -* ]]; then
    die_usage "unknown option $1 (see --help)"
  fi
  if [[ $allow_positional == 1 ]]; then
    OVERRIDES+=("$1")
    CONSUMED=1
    return 0
  fi
  die_usage "unexpected argument '$1' (see --help)"
}
