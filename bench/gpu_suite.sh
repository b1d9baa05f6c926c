#!/usr/bin/env bash
# Run the GPU-marked tests and the benchmarks on a CUDA machine; logs and result files go to $OUT (or /tmp/out).
# Usage: bash bench/gpu_suite.sh JOB... (tests e2e e2e-offload e2e-original e2e-ab conv sparse-conv-kernel layout-ab topk profile-dit vae
#   voxelize refiner coarse norms)   (wheels for packages the GPU image lacks may sit in .whl/)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for job in "$@"; do
  echo "=== $job"
  case "$job" in
    tests) timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    e2e-offload) timeout 280 python3 bench/e2e.py --offload 2>&1 | tee "$OUT/e2e_offload.log" ;;
    e2e) timeout 280 python3 bench/e2e.py 2>&1 | tee "$OUT/e2e.log" ;;
    e2e-original) timeout 590 python3 bench/e2e.py --original .scratch --warm --budget-s 580 --out "$OUT/e2e-vs-original.md" \
                    --original-json "$OUT/original.json" 2>&1 | tee "$OUT/e2e_original.log" ;;
    e2e-ab) # the untimed switches off, then on, in two processes: the sparse conv kernel (VAE decoding), the
            # channels-last refiners (refinement), the segmented top-k (sampling) and the sparse samplers' and
            # refiners' CUDA graphs (sampling, refinement); layout-ab and topk separate what shares a stage
            for on in off on; do
              graphs=$([ $on = on ] && echo all || echo dense)
              timeout 280 python3 bench/e2e.py --warm --substages --sparse-conv-kernel $on --channels-last $on \
                --segmented-topk $on --graphs $graphs --out "$OUT/e2e_ab_$on.md" 2>&1 | tee "$OUT/e2e_ab_$on.log"
            done ;;
    sparse-conv-kernel) timeout 120 python3 bench/bench_sparse_conv.py --kernel --out "$OUT/sparse_conv_kernel.md" 2>&1 | tail -14 ;;
    layout-ab) timeout 120 python3 bench/refiner_layout.py --ab --out "$OUT/refiner_layout_ab.md" 2>&1 | tail -20 ;;
    topk) timeout 120 python3 bench/bench_topk.py --topk 8 --out "$OUT/topk.md" 2>&1 | tail -40 ;;
    profile-dit) timeout 240 python3 bench/profile_dit.py --stages 1024 --reps 3 --out "$OUT/profile_dit.md" 2>&1 | tail -30 ;;
    norms) timeout 60 python3 bench/bench_norms.py 2>&1 | tail -15 ;;
    conv) timeout 90 python3 bench/bench_sparse_conv.py 2>&1 | tail -30 ;;
    vae) timeout 200 python3 bench/bench_sparse_vae.py --mesh --upstream .scratch 2>&1 | tail -30 ;;
    voxelize) timeout 90 python3 bench/bench_voxelize.py 2>&1 | tail -30 ;;
    refiner) timeout 150 python3 bench/bench_refiner.py --dense 2>&1 | tail -30 ;;
    coarse) timeout 150 python3 bench/bench_coarse.py --upstream .scratch --dinov2 .scratch/dinov2 2>&1 | tail -30 ;;
  esac
done
cp bench/results/*.md "$OUT/" 2>/dev/null; ls "$OUT"
