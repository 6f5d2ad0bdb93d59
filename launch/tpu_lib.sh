# Shared functions of the Cloud TPU launch scripts (sourced by launch/tpu.sh; bash 4+).
# Every gcloud / git command goes through run_cmd, so --dry-run prints exactly what would run.

TPU_DRY_RUN=${TPU_DRY_RUN:-0}
REMOTE_DIR='~/tgpo_jax'  # the project's directory on every worker (expanded by the worker's shell)

# Hardware table: name -> accelerator type, runtime version, hosts, default zone.
# Must match tgpo_jax/presets.py HARDWARE (tests/test_launch.py checks it).
declare -A HW_ACCEL=([v4-8]=v4-8 [v5e-8]=v5litepod-8 [v5p-8]=v5p-8 [v4-32]=v4-32)
declare -A HW_RUNTIME=([v4-8]=tpu-ubuntu2204-base [v5e-8]=v2-alpha-tpuv5-lite [v5p-8]=v2-alpha-tpuv5 [v4-32]=tpu-ubuntu2204-base)
declare -A HW_HOSTS=([v4-8]=1 [v5e-8]=1 [v5p-8]=1 [v4-32]=4)
declare -A HW_ZONE=([v4-8]=us-central2-b [v5e-8]=us-west4-a [v5p-8]=us-east5-a [v4-32]=us-central2-b)
HW_NAMES="v4-8 v5e-8 v5p-8 v4-32"

die() { echo "launch/tpu.sh: error: $*" >&2; exit 2; }

# One shell word per argument, quoted only when needed (single quotes), so the printed line can be
# pasted back into a shell.
quote_word() {
  local a=$1
  if [[ $a =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then  # --option=value: quote the value only
    printf '%s' "${BASH_REMATCH[1]}"
    a=${BASH_REMATCH[2]}
  fi
  if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote_word "$a")"; done
  printf '%s' "$out"
}

# Prints the command (dry run) or prints it to stderr and runs it.
run_cmd() {
  if [[ $TPU_DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

note() { printf '# %s\n' "$*"; }

check_hardware() {
  [[ -n ${HW_ACCEL[$1]:-} ]] || die "unknown hardware '$1'; accepted: $HW_NAMES"
}

# gcloud compute tpus tpu-vm <verb> NAME --zone=... [--project=...] <args...>; scp names the VM
# in its SOURCE / DEST arguments instead.
tpu_vm() {
  local verb=$1; shift
  local cmd=(gcloud compute tpus tpu-vm "$verb")
  [[ $verb == scp ]] || cmd+=("$TPU_NAME")
  cmd+=("--zone=$TPU_ZONE")
  [[ -n ${TPU_PROJECT:-} ]] && cmd+=("--project=$TPU_PROJECT")
  run_cmd "${cmd[@]}" "$@"
}

# Runs a shell command line on the given worker(s) ("all" or an index).
on_workers() {
  local worker=$1; shift
  tpu_vm ssh "--worker=$worker" "--command=$*"
}

tpu_create() {
  local extra=()
  [[ ${TPU_SPOT:-0} == 1 ]] && extra+=(--spot)
  [[ ${TPU_PREEMPTIBLE:-0} == 1 ]] && extra+=(--preemptible)
  tpu_vm create "--accelerator-type=${HW_ACCEL[$TPU_HARDWARE]}" "--version=${HW_RUNTIME[$TPU_HARDWARE]}" "${extra[@]}"
}

# Copies the committed project (git archive HEAD) to every worker and installs it in a venv with
# jax[tpu] and gcsfs (gs:// paths through etils.epath / fsspec).
tpu_install() {
  local tarball="${TMPDIR:-/tmp}/tgpo_jax-$TPU_NAME.tar.gz"
  run_cmd git archive --format=tar.gz -o "$tarball" HEAD
  tpu_vm scp "$tarball" "$TPU_NAME:tgpo_jax.tar.gz" --worker=all
  on_workers all "sudo apt-get update -qq && sudo apt-get install -y -qq $TPU_PYTHON $TPU_PYTHON-venv" \
    "&& mkdir -p $REMOTE_DIR && tar -xzf ~/tgpo_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR" \
    "&& $TPU_PYTHON -m venv .venv && .venv/bin/pip install -q -U pip" \
    "&& .venv/bin/pip install -q -e . \"jax[tpu]==0.10.2\" gcsfs"
}

# Copies the preset's student and teacher checkpoints (and the prompt files) from GCS to every
# worker and writes the student's context extension into its config.json.
tpu_models() {
  [[ -n ${TPU_PRESET:-} ]] || die "models needs --preset NAME (it names the student and teacher)"
  [[ -n ${TPU_MODELS_FROM:-} ]] || die "models needs --models-from gs://BUCKET/models (one HF directory per model name)"
  local args=(fetch "$TPU_PRESET" "$TPU_MODELS_FROM")
  [[ -n ${TPU_DATA_FROM:-} ]] && args+=("$TPU_DATA_FROM")
  on_workers all "bash $REMOTE_DIR/launch/tpu_worker.sh $(quote_cmd "${args[@]}")"
}

# Starts training on every worker (in the background; log in ~/tgpo-run.log on each worker).
tpu_run() {
  local args=(start)
  if [[ -n ${TPU_PRESET:-} ]]; then
    [[ -n ${TPU_HARDWARE:-} ]] || die "run with --preset needs --hardware (one of: $HW_NAMES)"
    args+=(preset train "$TPU_PRESET" "$TPU_HARDWARE")
  elif [[ -n ${TPU_CONFIG:-} ]]; then
    args+=(train --config "$TPU_CONFIG")
  else
    die "run needs --preset NAME --hardware HW, or --config FILE (a path inside the project)"
  fi
  [[ -n ${TPU_RUN_DIR:-} ]] && args+=("run_dir=$TPU_RUN_DIR")
  args+=("${TPU_OVERRIDES[@]}")
  on_workers all "bash $REMOTE_DIR/launch/tpu_worker.sh $(quote_cmd "${args[@]}")"
}

tpu_logs() {
  local follow=()
  [[ ${TPU_FOLLOW:-0} == 1 ]] && follow=(-f)
  on_workers "${TPU_WORKER:-0}" "tail -n 200 ${follow[*]:+${follow[*]} }~/tgpo-run.log"
}

# A run's outputs on this machine: gcloud storage rsync for a gs:// run_dir, scp from worker 0 otherwise.
tpu_fetch() {
  [[ -n ${TPU_RUN_DIR:-} ]] || die "fetch needs --run-dir (the run's gs:// URL or its path on the workers)"
  local to=${TPU_TO:-runs/$(basename "$TPU_RUN_DIR")}
  if [[ $TPU_RUN_DIR == gs://* ]]; then
    run_cmd gcloud storage rsync -r -x 'checkpoints/.*' "$TPU_RUN_DIR" "$to"
  else
    tpu_vm scp --recurse "$TPU_NAME:$REMOTE_DIR/$TPU_RUN_DIR" "$to" --worker=0
  fi
}

tpu_stop() { on_workers all "bash $REMOTE_DIR/launch/tpu_worker.sh stop"; }
tpu_delete() { tpu_vm delete --quiet; }
tpu_state() { tpu_vm describe '--format=value(state)'; }
