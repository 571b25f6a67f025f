# Sourced by .ci/gpu-check and .ci/gpu-profile after they set OUT, PYTHON, PRESET, DEADLINE and LOG (the log
# file under $OUT): the wheels .ci/gpu-wheels brought, the environment, a scratch folder removed at exit, and
# the helpers that keep every stage inside the call's deadline.
mkdir -p "$OUT"
: > "$OUT/$LOG"
SCRATCH=$(mktemp -d /tmp/finetune-gpu-XXXX)
trap 'rm -rf "$SCRATCH"' EXIT
if [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MODEL="$SCRATCH/bench/models/$PRESET"  # the SD1.5-size model the first bench stage builds

# limit WANTED: WANTED seconds, or what is left before the deadline less a margin (0: skip the stage).
# Stages run under `timeout -k`: a training process takes SIGTERM as a request to checkpoint and stop (so
# pytest, training in-process, would carry on), and SIGKILL follows.
limit() { local left=$((DEADLINE - SECONDS - 10)); if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi; }
# stage NAME WANTED: sets t, the stage's time limit (limit WANTED; 0: the stage is skipped) and logs which.
stage() {
  t=$(limit "$2")
  if [ "$t" -gt 0 ]; then echo "== $1 at ${SECONDS}s (limit $t s)"; else echo "== $1: skipped at ${SECONDS}s, too near DEADLINE ($DEADLINE s)"; fi |
    tee -a "$OUT/$LOG"
}
built() { [ -f "$MODEL/model_index.json" ] || { echo "skipped: no model was built" | tee -a "$OUT/$LOG"; false; }; }
