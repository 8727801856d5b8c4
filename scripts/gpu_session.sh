#!/usr/bin/env bash
# Run named steps of the GPU validation on the GPU machine, each with its own time limit,
# logging to $OUT/<step>.log and printing a one-line verdict per step at the end.
#   bash scripts/gpu_session.sh tests train bench
# Steps: env, tests, train, resume, tp2, bench, rbench, benchtests, vsnative, vsnative_r.
# Needs the staged wheels on PYTHONPATH.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TINY=(tiny --set precision.params_dtype=bf16)
verdicts=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    verdicts+=("$name rc=$rc $((SECONDS - t0))s")
}
for s in "$@"; do case $s in
  env) step env 120 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, megatron.core as m; print(torch.__version__, triton.__version__, m.__version__, torch.cuda.get_device_name())"; python3 -c "import transformer_engine as te; print(\"te\", te.__version__)"; python3 -c "import mamba_ssm, causal_conv1d; print(\"mamba\", mamba_ssm.__version__)"' ;;
  tests) step tests 480 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA ;;
  train) step train_embedded 300 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$OUT/tiny_embedded.json"
         step train_mock 200 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --set data.source=mock --train-iters 60 --receipt "$OUT/tiny_mock.json" ;;
  resume) rm -rf /tmp/ckpt
          step resume_first 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$OUT/tiny_resume.json" -- --save /tmp/ckpt --save-interval 100 --exit-interval 100
          step resume_second 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$OUT/tiny_resume.json" -- --save /tmp/ckpt --save-interval 100 --load /tmp/ckpt ;;
  tp2) step tp2_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/gpu/test_tensor_parallel_gpu.py "tests/gpu/test_model_gpu.py::test_te_and_local_agree"
       step tp2_train 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --set parallel.tensor=2 --set parallel.sequence_parallel=true --train-iters 100 --receipt "$OUT/tiny_tp2.json" ;;
  bench) step bench 540 python3 scripts/bench_layers.py --hidden 2048 4096 --families AEMFR --json "$OUT/bench_layers.json" ;;
  rbench) step rbench 540 python3 scripts/bench_r_scan.py --quick --sweep --no-reference --json "$OUT/r_sweep.json" ;;
  benchtests) step benchtests 400 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/gpu/test_bench_gpu.py ;;
  vsnative) step vsnative 580 python3 -m megacpp_mcore.cli.main bench --quick --budget-s 400 --json "$OUT/bench_quick.json" ;;
  vsnative_r) step vsnative_r 580 python3 -m megacpp_mcore.cli.main bench --quick --pattern AEMEAEMEAEMR --families R --budget-s 400 --json "$OUT/bench_r.json" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
printf '%s\n' "${verdicts[@]}"
