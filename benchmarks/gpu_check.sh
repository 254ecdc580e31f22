#!/usr/bin/env bash
# The GPU run of benchmarks/train_throughput.py: ResNet-50 (eager and torch.compile)
# and MobileNetV3-Large at 224 px, batch 256; about 5-6 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # logs and JSON under $OUT (or /tmp/gpu_check)
#
# Needs torch, torchvision, timm, numpy, Pillow, tqdm, pyyaml and pydantic. A GPU
# box without pydantic can carry its wheels in .whl/ (see benchmarks/README.md);
# they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; "$PY" -V;
  "$PY" -c "import torch, torchvision, timm; print(torch.__version__, torchvision.__version__, timm.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# Each run is capped so one slow compile cannot eat the other's time.
status=0
timeout 330 "$PY" benchmarks/train_throughput.py --device cuda --arch resnet50 --compile 2>&1 \
  | tee "$OUT/resnet50.log" || status=1
timeout 150 "$PY" benchmarks/train_throughput.py --device cuda --arch mobilenet_v3_large 2>&1 \
  | tee "$OUT/mobilenet_v3_large.log" || status=1
for name in resnet50 mobilenet_v3_large; do
  tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
done
exit $status
