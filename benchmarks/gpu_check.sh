#!/usr/bin/env bash
# The GPU check: one prepared run for a session that is lent a CUDA machine.
# Records on the GPU (cuDNN) and checks the numbers against the CPU reference,
# then runs benchmark part 1 on CUDA. Writes into ${OUT:-.}: gpu-tests.txt and
# results-cuda.md, then profiles recorded steps (gpu-profile.txt). Needs a torch with CUDA on that machine (not the CPU wheel).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # seqscope from this checkout, not installed
out="${OUT:-.}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "C compiler: $(command -v cc gcc clang | head -1)" | tee -a "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"
SEQSCOPE_REQUIRE_CUDA=1 timeout 200 python3 -m pytest -q -p no:cacheprovider \
    tests/test_fused_reference.py::test_recorded_numbers_on_cuda_match_unrolled_reference \
    tests/test_native.py 2>&1 | tee "$out/gpu-tests.txt" | tail -20
# the writer's eigensolver (sigma_max of GPU weights) by BLAS threads: it bounds recorded steps at H=512
timeout 60 python3 - <<'PY' 2>&1 | tee "$out/sigma-threads.txt"
import time, numpy as np
from threadpoolctl import threadpool_limits
from seqscope.capture import spectral
print("writer_blas_threads():", spectral.writer_blas_threads())
for h in (256, 512):
    w = (np.random.default_rng(0).standard_normal((4 * h, h)) * 0.05).astype(np.float32)
    for n in (1, 2, 4, 8):
        with threadpool_limits(limits=n, user_api="blas"):
            gram = (w.T @ w).astype(np.float64)
            np.linalg.eigvalsh(gram)
            t0 = time.perf_counter()
            for _ in range(5):
                np.linalg.eigvalsh((w.T @ w).astype(np.float64))
        print(f"H={h} threads={n}: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")
PY
timeout 240 python3 benchmarks/run.py --device cuda --only recorder --reps 5 --out "$out/results-cuda.md" \
    2>&1 | grep -v "^USDT" | tail -20
[ "${SKIP_PROFILE:-0}" = 1 ] || timeout 100 python3 benchmarks/gpu_profile.py "$out" 2>&1 | grep -v "^USDT"
