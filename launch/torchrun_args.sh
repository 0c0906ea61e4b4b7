# Sourced by run_local.sh and run_multinode.sh: how their arguments reach torchrun and train.py.
#
# split_torchrun_args ARGS...
#   torchrun_opts: --max-restarts $MAX_RESTARTS (default 0) unless an option sets it, the options in
#                  $TORCHRUN_ARGS (word-split), then ARGS before a `--` (so the command line wins);
#   train_args:    ARGS after the `--`, or all of ARGS when there is none.
split_torchrun_args() {
  local given=() opt
  read -r -a given <<< "${TORCHRUN_ARGS:-}"
  train_args=("$@")
  local i
  for ((i = 0; i < $#; i++)); do
    if [[ "${train_args[i]}" == "--" ]]; then
      given+=("${train_args[@]:0:i}")
      train_args=("${train_args[@]:i+1}")
      break
    fi
  done
  torchrun_opts=(--max-restarts "${MAX_RESTARTS:-0}")
  for opt in ${given[@]+"${given[@]}"}; do
    if [[ "$opt" == --max[-_]restarts || "$opt" == --max[-_]restarts=* ]]; then torchrun_opts=(); fi
  done
  torchrun_opts+=(${given[@]+"${given[@]}"})
}
