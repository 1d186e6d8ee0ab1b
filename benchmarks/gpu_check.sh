#!/usr/bin/env bash
# The GPU check: one prepared run for a session that is lent a CUDA machine.
# Records on the GPU (cuDNN) and checks the numbers against the CPU reference,
# then runs benchmark part 1 on CUDA. Writes into ${OUT:-.}: gpu-tests.txt and
# results-cuda.md, then profiles recorded steps (gpu-profile.txt, torch.profiler; SEQSCOPE_PROFILE_SIZES=2: H=64, 256
# only; SKIP_PROFILE=1 skips it) and the training thread by Python function (gpu-cprofile.txt; SKIP_CPROFILE=1). Needs a torch with CUDA on that machine (not the CPU wheel).
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
# sigma_max of GPU weights on the writer thread (it bounded recorded steps at H=512 in session 9):
# numpy's dense eigensolver against the compiled Lanczos iteration, both at the writer's BLAS threads
timeout 90 python3 - <<'PY' 2>&1 | tee "$out/sigma-writer.txt"
import time, numpy as np
from seqscope.capture import native, spectral
print("writer_blas_threads():", spectral.writer_blas_threads(), "compiled:", native.enabled(),
      "MKL per-thread limit:", native._mkl_local_threads is not None)
compiled = native.top_eigenvalue
for h in (64, 256, 512):
    w = (np.random.default_rng(0).standard_normal((4 * h, h)) * 0.05).astype(np.float32)
    times = {"dense": [], "compiled": []}
    for _ in range(3):
        for name in times:
            native.top_eigenvalue = compiled if name == "compiled" else (lambda g, loaded=None, threads=None: None)
            spectral.sigma_max_host(w)
            t0 = time.perf_counter()
            for _ in range(5):
                value = spectral.sigma_max_host(w)
            times[name].append((time.perf_counter() - t0) / 5 * 1e3)
        native.top_eigenvalue = compiled
    print(f"H={h} (W {4 * h}x{h}) sigma_max_host: dense {min(times['dense']):.2f} ms, compiled {min(times['compiled']):.2f} ms")
PY
timeout 300 python3 benchmarks/run.py --device cuda --only recorder --reps 9 --out "$out/results-cuda.md" \
    2>&1 | grep -v "^USDT" | tail -20
[ "${SKIP_PROFILE:-0}" = 1 ] || timeout 100 python3 benchmarks/gpu_profile.py "$out" 2>&1 | grep -v "^USDT"
# the training thread's time by Python function (cProfile; backward hooks run on autograd's device thread and are not in it)
[ "${SKIP_CPROFILE:-0}" = 1 ] || timeout 90 python3 benchmarks/gpu_cprofile.py "$out" 2>&1 | grep -v "^USDT"
