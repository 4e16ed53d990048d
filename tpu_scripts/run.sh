#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run `jaxlora train` on every worker of a TPU VM / pod slice.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --bucket BUCKET --run-name RUN
              [options] [--] [section.key=value ...]

First stops what may still hold the TPUs on every worker (an earlier 'jaxlora train', any
process with /dev/vfio or /dev/accel* open, the libtpu lock file), then runs on all
workers at once (--worker=all), in ~/$REMOTE_DIR (see setup.sh):
  jaxlora train --config CONFIG output_dir=gs://BUCKET/RUN distributed.initialize=true [overrides]
Each worker appends its output to ~/$REMOTE_LOG_DIR/RUN-<hostname>.log; the output of all
workers also streams here. The exit status is that of the training command (75: it stopped
on SIGTERM/SIGINT, e.g. a preemption notice, after checkpointing the step in flight). Running
the same command again resumes from the latest checkpoint in gs://BUCKET/RUN.

Options:
$COMMON_HELP
  --config CONFIG      YAML preset, relative to the project on the workers
                       (e.g. configs/llama3-8b-chat.yaml)
  --bucket BUCKET      gs:// bucket, optionally with a path: my-bucket or gs://my-bucket/runs
                       (env TPU_BUCKET); the workers' service account needs write access
  --run-name RUN       run directory under the bucket; also names the log files
  --env KEY=VALUE      environment variable for the training processes (repeatable),
                       e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true
  --fetch-logs DIR     afterwards (also after a failure), copy every worker's log into DIR
  --                   everything after it is a config override (so is any key=value
                       argument before it); output_dir is set from --bucket/--run-name

Example:
  $PROG --name my-tpu --zone us-east5-b --config configs/llama3-8b-chat.yaml \\
      --bucket my-bucket --run-name llama-chat -- train.steps=2000 lora.rank=32
EOF
}

CONFIG=''
BUCKET=${TPU_BUCKET:-}
RUN_NAME=''
FETCH_LOGS=''
ENVS=()
OVERRIDES=()
while (($#)); do
  case $1 in
    --) shift; OVERRIDES+=("$@"); break ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --bucket) need_value "$@"; BUCKET=$2; shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --fetch-logs) need_value "$@"; FETCH_LOGS=$2; shift 2 ;;
    *) parse_other_arg 1 "$@"; shift "$CONSUMED" ;;
  esac
done

check_common
[[ -n $CONFIG ]] || die_usage "--config is required"
[[ -n $BUCKET ]] || die_usage "--bucket is required (or set TPU_BUCKET)"
[[ -n $RUN_NAME ]] || die_usage "--run-name is required"
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
[[ $BUCKET =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9](/[^/[:space:]]+)*$ ]] ||
  die_usage "invalid --bucket '$BUCKET': expected a bucket name, optionally with a path"
[[ $RUN_NAME =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
  die_usage "invalid --run-name '$RUN_NAME': use letters, digits, '.', '_' and '-'"
[[ $CONFIG != *[[:space:]]* ]] || die_usage "--config must not contain spaces"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env takes KEY=VALUE, got '$kv'"
done
for kv in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case $kv in
    output_dir=*) die_usage "output_dir is set from --bucket and --run-name; drop '$kv'" ;;
    distributed.initialize=*) die_usage "distributed.initialize is always true here; drop '$kv'" ;;
    [A-Za-z_]*=*) ;;
    *) die_usage "override '$kv' must look like section.key=value" ;;
  esac
done
OUTPUT_DIR="gs://$BUCKET/$RUN_NAME"

# 1. Stop stale processes. The pattern is written [j]axlora so that pkill does not match
#    the shell that runs this very command line.
kill_cmd='sudo pkill -f "[j]axlora train" || true;'
kill_cmd+=' sudo lsof -t /dev/vfio/* /dev/accel* 2>/dev/null | xargs -r sudo kill -9 || true;'
kill_cmd+=' sudo rm -f /tmp/libtpu_lockfile'
run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command "$kill_cmd"

# 2. Train on all workers. Keepalives end the ssh session soon after a worker disappears
#    (preemption) instead of leaving it hanging.
train="jaxlora train --config $(quote_word "$CONFIG") $(quote_word "output_dir=$OUTPUT_DIR")"
train+=" distributed.initialize=true"
for kv in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  train+=" $(quote_word "$kv")"
done
remote="set -o pipefail; mkdir -p ~/$REMOTE_LOG_DIR; cd ~/$REMOTE_DIR;"
# shellcheck disable=SC2016  # expanded on the worker
remote+=' export PATH="$HOME/.local/bin:$PATH";'
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  remote+=" export ${kv%%=*}=$(quote_word "${kv#*=}");"
done
remote+=" $train 2>&1 | tee -a ~/$REMOTE_LOG_DIR/$RUN_NAME-\$(hostname).log"
rc=0
run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all \
  --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=4 \
  --command "$remote" || rc=$?

# 3. Optionally copy the logs back.
if [[ -n $FETCH_LOGS ]]; then
  if ((!DRY_RUN)); then
    mkdir -p "$FETCH_LOGS"
  fi
  run_cmd gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_LOG_DIR/$RUN_NAME-*.log" "$FETCH_LOGS/" \
    "${SCOPE[@]}" --worker=all || log "warning: could not copy the logs back"
fi
if ((rc == 75)); then  # jaxlora train's status after SIGTERM/SIGINT (see babysit.sh)
  log "training stopped on a signal after checkpointing (status 75); rerun to resume"
elif ((rc != 0)); then
  log "training exited with status $rc"
fi
exit "$rc"
