#!/usr/bin/env bash
# Runs ON each TPU worker, called by launch/tpu.sh over `gcloud compute tpus tpu-vm ssh`:
#   start ARGS...   tgpo-jax ARGS in the background (log ~/tgpo-run.log, exit code ~/tgpo-run.exit)
#   status          running | done | failed N | stopped | idle
#   stop            stops the background run (status then says stopped)
#   fetch PRESET MODELS_URL [DATA_URL]
#                   copies the preset's student and teacher HF directories from MODELS_URL/<name>
#                   to models/<name> (and DATA_URL to data/), then writes the student's context
#                   extension (the preset's student_context) into its config.json
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${TGPO_RUN_STATE:-$HOME}
LOG=$STATE/tgpo-run.log EXIT=$STATE/tgpo-run.exit PID=$STATE/tgpo-run.pid
TGPO=${TGPO_BIN:-.venv/bin/tgpo-jax}
PY=${TGPO_PYTHON:-.venv/bin/python}

alive() { [[ -f $PID ]] && kill -0 "$(cat "$PID")" 2>/dev/null; }

case ${1:-} in
  start)
    shift
    if alive; then echo "running (pid $(cat "$PID"))"; exit 0; fi
    rm -f "$EXIT"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    setsid nohup bash -c '"$1" "${@:3}"; echo $? > "$2"' _ "$TGPO" "$EXIT" "$@" >> "$LOG" 2>&1 < /dev/null &
    echo $! > "$PID"
    echo "started (pid $!): $TGPO $*; log $LOG" ;;
  status)
    if alive; then echo running
    elif [[ -f $EXIT ]]; then
      code=$(cat "$EXIT")
      case $code in 0) echo done ;; stopped) echo stopped ;; *) echo "failed $code" ;; esac
    else echo idle; fi ;;
  stop)
    if alive; then kill -TERM -- "-$(cat "$PID")" && echo stopped > "$EXIT" && echo stopped; else echo "not running"; fi ;;
  fetch)
    [[ $# -ge 3 ]] || { echo "usage: tpu_worker.sh fetch PRESET MODELS_URL [DATA_URL]" >&2; exit 2; }
    for name in $("$PY" -c 'import sys; from tgpo_jax.presets import preset_models; print(*preset_models(sys.argv[1]))' "$2"); do
      mkdir -p "models/$name"
      gcloud storage rsync -r "$3/$name" "models/$name"
    done
    if [[ -n ${4:-} ]]; then mkdir -p data && gcloud storage rsync -r "$4" data; fi
    "$PY" -c 'import sys; from tgpo_jax.presets import patch_student_config; print(patch_student_config(sys.argv[1]))' "$2" ;;
  *) echo "usage: tpu_worker.sh start ARGS... | status | stop | fetch PRESET MODELS_URL [DATA_URL]" >&2; exit 2 ;;
esac
