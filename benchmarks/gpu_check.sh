#!/usr/bin/env bash
# One prepared check on a CUDA machine (the lent H100/H200): versions, the CUDA kernel tests, then the kernel and
# train benchmark suites at the paper shapes, then the tile sweep, each step under its own time limit, everything
# written to $OUT.
#   git rev-parse HEAD > GIT_SHA          # here, before the tree travels (the copy there has no .git)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl liger-kernel inf-cl    # optional peers, carried as .whl/
#   # optional, for the train suite's DeepSpeed rows: PyPI has only an sdist of deepspeed, which builds here as a
#   # pure-Python wheel, plus its dependencies the GPU machine lacks (same pip download flags as above):
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download ... -d .whl hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types \
#       typing-inspection einops
#   OUT=runs/gpu-check bash benchmarks/gpu_check.sh     # there; on the device tool $OUT is set for you
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --shapes tiny --out /tmp/dry   # a dry run here:
#       every step starts and writes its files (tiny shapes, the kernels on Triton's interpreter)
# Files (8, the device tool's limit): env.txt, cuda-tests.log (per-test relative errors, durations), kernels-cuda
# .jsonl / .md / .png, tune.json / tune.md (the tile sweep: configs that do not spill in the committed sm_90 compile
# report benchmarks/results/tune-sm90.json, timed), logs.tar.gz (cuda-tests.xml, kernels.log, tune.log, train.log
# and the train suite's train-cuda.jsonl / .md / .png: one encoder step and one pretraining step, ours per
# attention backend against the HF peers; its DeepSpeed rows run where deepspeed was carried in .whl/, else they
# are rows saying why).
# Estimated: tests ~2 min (84 s on the H200 before the gemm InfoNCE and flex cases were added), kernel benchmark
# <= 3 min, train benchmark <= 1.5 min, sweep <= 1.5 min: each cut off by its own timeout (150 + 180 + 90 + 90 =
# 510 s, rows written as they come), under the device tool's 600 s a command.
set -u
OUT=${OUT:-runs/gpu-check}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-paper}
while [ $# -gt 0 ]; do  # flags win over the environment: --device cpu --shapes tiny --out DIR
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --shapes) SHAPES=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (known: --device cpu|cuda, --shapes tiny|paper|long, --out DIR)" >&2
       exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the SHA the benchmark rows carry: the copy there may hold no .git, or the .git of another commit
[ -f GIT_SHA ] && export JEPA4REC_GIT_SHA=$(cat GIT_SHA)
# the kernel suite's library peers (liger-kernel, inf-cl) where their pure-Python wheels were carried in .whl/
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
  cat GIT_SHA 2>/dev/null || echo "no GIT_SHA file"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  echo "device $DEVICE, shapes $SHAPES"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -s -p no:cacheprovider tests/test_cuda_kernels.py \
  --junitxml="$OUT/cuda-tests.xml" --durations=12 > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests: exit $? after $(( $(date +%s) - start )) s"
grep -E "passed|failed|error" "$OUT/cuda-tests.log" | tail -3
grep -E "^FAILED|^ERROR|Error" "$OUT/cuda-tests.log" | head -20
start=$(date +%s)
if [ "$DEVICE" = cpu ]; then INTERPRET=1; SMOKE=--smoke; else INTERPRET=; SMOKE=; fi
TRITON_INTERPRET=$INTERPRET timeout "${BENCH_TIMEOUT:-180}" $PY benchmarks/run.py --suite kernels --device "$DEVICE" \
  --shapes "$SHAPES" $SMOKE --out "$OUT/kernels-$DEVICE.jsonl" > "$OUT/kernels.log" 2>&1
echo "kernel benchmark: exit $? after $(( $(date +%s) - start )) s"
tail -25 "$OUT/kernels.log"
start=$(date +%s)
# the train suite always runs its first case only here (--smoke: one shape, short timing): a whole-model step
TRITON_INTERPRET=$INTERPRET timeout "${TRAIN_TIMEOUT:-90}" $PY benchmarks/run.py --suite train --device "$DEVICE" \
  --shapes "$SHAPES" --smoke --out "$OUT/train-$DEVICE.jsonl" > "$OUT/train.log" 2>&1
echo "train benchmark: exit $? after $(( $(date +%s) - start )) s"
tail -12 "$OUT/train.log"
start=$(date +%s)
mkdir -p "$OUT/tune"
# the committed compile report is for the paper shapes; other shapes compile here (without the interpreter)
PRUNE=; [ "$SHAPES" = paper ] && PRUNE="--prune benchmarks/results/tune-sm90.json"
env -u TRITON_INTERPRET timeout "${TUNE_TIMEOUT:-90}" $PY benchmarks/tune_kernels.py --device "$DEVICE" \
  --shapes "$SHAPES" --max-configs "${TUNE_CONFIGS:-8}" $PRUNE --out "$OUT/tune" > "$OUT/tune.log" 2>&1
echo "tile sweep: exit $? after $(( $(date +%s) - start )) s"
mv "$OUT/tune/tune.json" "$OUT/tune/tune.md" "$OUT/" 2>/dev/null; rmdir "$OUT/tune" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" --remove-files $(cd "$OUT" && ls cuda-tests.xml kernels.log tune.log train.log \
  train-"$DEVICE".jsonl train-"$DEVICE".md train-"$DEVICE".png 2>/dev/null)
ls "$OUT"
