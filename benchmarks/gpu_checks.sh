#!/bin/bash
# Every GPU check of the project in one run, for a lent device machine (an H100 or H200 image
# with CUDA PyTorch; about 6-8 minutes): the CUDA tests (skipped on machines without a GPU)
# and the merge throughput benchmark with its math on the GPU (benchmarks/bench_throughput.py
# --device cuda, against a floor that copies each pair of tensors to the card, adds there and
# copies the sum back).
#
# The image lacks a few of the package's requirements. Fetch them here once, as Python 3.12
# wheels, into a folder git ignores:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl mergekit==0.1.5 pydantic==2.13.4 \
#     pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 immutables==0.21 \
#     cma==4.5.0
# then run it there with `.whl` carried and a limit of 600 s:
#   bash benchmarks/gpu_checks.sh
# Its logs and benchmarks/results/throughput_cuda.{md,json} land in $OUT (or /tmp/gpu_checks).
set -o pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"

# The CUDA tests: pruning's memory on the card, the kernel against the CPU in bfloat16, the
# scorer's batch size, SCF-RKL's scores, the landscape's curvature.
timeout 240 python3 -m pytest -q -rs -o addopts="" -p no:cacheprovider -k cuda \
  tests/test_method_sparsity.py tests/test_scale_driver.py tests/test_landscape.py \
  tests/test_method_scf_rkl_functional.py 2>&1 | tee "$OUT/cuda_tests.log"

# Merge throughput with the math on the GPU (0.47B-parameter Llama shapes, bf16 and fp32).
timeout 420 python3 benchmarks/bench_throughput.py --device cuda --rounds 3 --write 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/throughput_cuda.log"
cp benchmarks/results/throughput_cuda.md benchmarks/results/throughput_cuda.json "$OUT"/
