#!/usr/bin/env bash
# Cloud TPU VMs for tgpo_jax: create, install, fetch models, run, logs, fetch, stop, delete, babysit.
# Every command takes --dry-run, which prints the exact commands (gcloud, git) it would run.
# Step by step: docs/tpu.md. Functions: launch/tpu_lib.sh; worker side: launch/tpu_worker.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/tpu_lib.sh

usage() {
  cat <<'EOF'
usage: launch/tpu.sh COMMAND --name TPU [options] [--dry-run] [-- key.path=value ...]

commands:
  create    --hardware HW [--spot | --preemptible]       create the TPU VM (single host or pod slice)
  install                                                copy the committed project to every worker, venv + pip install
  models    --preset P --models-from gs://B/models [--data-from gs://B/data]
                                                         copy the preset's checkpoints (and prompts) to every worker
  run       (--preset P --hardware HW | --config FILE) [--run-dir gs://B/runs/x] [-- key=value ...]
                                                         start training on all workers (resumes from run_dir)
  logs      [--worker N] [--follow]                      tail a worker's run log
  fetch     --run-dir DIR [--to LOCAL]                   copy a run's metrics / TensorBoard files here
  status                                                 the VM's state (READY, PREEMPTED, ...)
  stop                                                   stop the training on all workers
  delete                                                 delete the VM
  babysit   create + run options, --run-dir gs://... [--interval S] [--max-recoveries N]
            watch the run; on preemption recreate the VM, reinstall and resume from the latest checkpoint

options: --zone Z (default: the hardware's), --project P, --python python3.11
hardware: v4-8 v5e-8 v5p-8 v4-32
EOF
}

parse_args() {
  TPU_OVERRIDES=()
  TPU_PYTHON=python3.11
  TPU_INTERVAL=300
  TPU_MAX_RECOVERIES=20
  while [[ $# -gt 0 ]]; do
    case $1 in
      --name) TPU_NAME=$2; shift ;;
      --zone) TPU_ZONE=$2; shift ;;
      --project) TPU_PROJECT=$2; shift ;;
      --hardware) TPU_HARDWARE=$2; shift ;;
      --spot) TPU_SPOT=1 ;;
      --preemptible) TPU_PREEMPTIBLE=1 ;;
      --preset) TPU_PRESET=$2; shift ;;
      --config) TPU_CONFIG=$2; shift ;;
      --run-dir) TPU_RUN_DIR=$2; shift ;;
      --models-from) TPU_MODELS_FROM=$2; shift ;;
      --data-from) TPU_DATA_FROM=$2; shift ;;
      --python) TPU_PYTHON=$2; shift ;;
      --worker) TPU_WORKER=$2; shift ;;
      --follow) TPU_FOLLOW=1 ;;
      --to) TPU_TO=$2; shift ;;
      --interval) TPU_INTERVAL=$2; shift ;;
      --max-recoveries) TPU_MAX_RECOVERIES=$2; shift ;;
      --dry-run) TPU_DRY_RUN=1 ;;
      --) shift; TPU_OVERRIDES=("$@"); break ;;
      *) die "unknown option '$1' (see launch/tpu.sh --help)" ;;
    esac
    shift
  done
  [[ -n ${TPU_NAME:-} ]] || die "--name TPU_NAME is required"
  [[ -z ${TPU_SPOT:-} || -z ${TPU_PREEMPTIBLE:-} ]] || die "give --spot or --preemptible, not both"
  if [[ -n ${TPU_HARDWARE:-} ]]; then
    check_hardware "$TPU_HARDWARE"
    TPU_ZONE=${TPU_ZONE:-${HW_ZONE[$TPU_HARDWARE]}}
  fi
  [[ -n ${TPU_ZONE:-} ]] || die "--zone is required when --hardware is not given"
}

babysit_plan() {
  note "babysit $TPU_NAME: every ${TPU_INTERVAL}s until worker 0 reports the run done (at most $TPU_MAX_RECOVERIES recoveries)"
  note "1. the VM's state"
  tpu_state
  note "2. PREEMPTED, TERMINATED, STOPPED or no VM: recreate it and resume from the latest checkpoint in $TPU_RUN_DIR"
  tpu_delete
  recreate
  note "3. READY: ask worker 0 about the run (running | done | failed N | stopped | idle)"
  on_workers 0 "bash $REMOTE_DIR/launch/tpu_worker.sh status"
  note "4. failed or idle: start it again on all workers (it resumes from the latest checkpoint)"
  tpu_run
}

recreate() {
  tpu_create
  tpu_install
  [[ -n ${TPU_MODELS_FROM:-} ]] && tpu_models
  tpu_run
}

babysit() {
  [[ -n ${TPU_HARDWARE:-} ]] || die "babysit needs --hardware (to recreate the VM)"
  [[ ${TPU_RUN_DIR:-} == gs://* ]] || die "babysit needs --run-dir gs://...: a recreated VM starts with an empty disk, so checkpoints must live in GCS"
  [[ -n ${TPU_PRESET:-}${TPU_CONFIG:-} ]] || die "babysit needs --preset NAME or --config FILE"
  if [[ $TPU_DRY_RUN == 1 ]]; then babysit_plan; return; fi
  local recoveries=0 state status
  while true; do
    state=$(tpu_state 2>/dev/null || echo MISSING)
    case $state in
      READY)
        status=$(on_workers 0 "bash $REMOTE_DIR/launch/tpu_worker.sh status" 2>/dev/null | tail -n 1 || echo unreachable)
        echo "[babysit] $(date -u +%FT%TZ) state READY, run $status" >&2
        case $status in
          done) echo "[babysit] the run finished" >&2; return 0 ;;
          stopped) echo "[babysit] the run was stopped (launch/tpu.sh stop): not restarting it" >&2; return 0 ;;
          running|unreachable) ;;
          *) recoveries=$((recoveries + 1)); tpu_run ;;
        esac ;;
      CREATING|STARTING|RESTARTING|REPAIRING|DELETING|STOPPING) echo "[babysit] state $state: waiting" >&2 ;;
      *)
        echo "[babysit] $(date -u +%FT%TZ) state $state: recreating $TPU_NAME" >&2
        recoveries=$((recoveries + 1))
        [[ $state == MISSING ]] || tpu_delete
        recreate ;;
    esac
    ((recoveries <= TPU_MAX_RECOVERIES)) || die "gave up after $TPU_MAX_RECOVERIES recoveries"
    sleep "$TPU_INTERVAL"
  done
}

main() {
  [[ $# -ge 1 ]] || { usage; exit 2; }
  local cmd=$1; shift
  case $cmd in -h|--help|help) usage; exit 0 ;; esac
  parse_args "$@"
  case $cmd in
    create) [[ -n ${TPU_HARDWARE:-} ]] || die "create needs --hardware (one of: $HW_NAMES)"; tpu_create ;;
    install) tpu_install ;;
    models) tpu_models ;;
    run) tpu_run ;;
    logs) tpu_logs ;;
    fetch) tpu_fetch ;;
    status) tpu_state ;;
    stop) tpu_stop ;;
    delete) tpu_delete ;;
    babysit) babysit ;;
    *) die "unknown command '$cmd'; accepted: create install models run logs fetch status stop delete babysit" ;;
  esac
}

main "$@"
