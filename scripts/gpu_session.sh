#!/usr/bin/env bash
# Run named steps of the GPU validation on the GPU machine, each with its own time limit
# (cut to what is left of $DEADLINE seconds, counted from the script's start, so the logs
# always come back), logging to $LOGDIR/<step>.log and printing a one-line verdict per step.
#   bash scripts/gpu_session.sh tests train bench
# Steps: env, tests, gputests (one pytest per file, failure reasons printed), recipes (one
# pytest per shipped recipe), gpu2tests
# (the two-GPU tests), gdntrain, tier_a, tier_b, train, features, resume, quarter, tp2, tp2feat, dp2feat,
# ep2feat, fsdp2feat, bench, rbench, benchtests, benchfeat, vsnative, vsnative_r, tune, experts,
# dense, and any
# comma-separated list of test ids under tests/gpu (test_x.py::name,test_y.py), run as one step. Needs the staged wheels on PYTHONPATH.
# Logs and receipts go to $LOGDIR and are packed into $OUT/$TAG.tgz at the end (the device
# tool returns at most 8 files), so two sessions can run side by side on two GPUs
# (CUDA_VISIBLE_DEVICES=0 TAG=a ... & CUDA_VISIBLE_DEVICES=1 TAG=b ...).
set -u
OUT=${OUT:-/tmp/out}; TAG=${TAG:-session}; LOGDIR=${LOGDIR:-/tmp/gpulogs/$TAG}
DEADLINE=${DEADLINE:-100000}
mkdir -p "$OUT" "$LOGDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TINY=(tiny --set precision.params_dtype=bf16)
# all three plasticity tools and STP inside 60 steps, bf16, distributed optimizer
FEAT=(--set parallel.distributed_optimizer=true --train-iters 60
      --set 'plasticity.fire.steps=[20,40]' --set plasticity.dash.every=15
      --set plasticity.dash.start=10 --set plasticity.redo.every=25 --set plasticity.redo.start=25
      --set plasticity.redo.tau=0.1 --set stp.enabled=true --set stp.start_step=10)
verdicts=()
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS left=$((DEADLINE - SECONDS)) n=2 base=$name
    while [[ -e $LOGDIR/$name.log ]]; do name=${base}_$n; n=$((n + 1)); done  # keep every log
    if ((left < 15)); then verdicts+=("$name skipped: deadline"); return; fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" > "$LOGDIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGDIR/$name.log"
    verdicts+=("$name rc=$rc $((SECONDS - t0))s")
    printf '%s\n' "${verdicts[@]}" > "$LOGDIR/verdicts.txt"
    tar czf "$OUT/$TAG.tgz" -C "$LOGDIR" . 2>/dev/null || true
}
pytest_ids() {  # pytest_ids SECONDS ID...: one pytest step over tests/gpu ids, reasons printed
    local limit=$1; shift
    step "pytest_$(basename "${1%%::*}" .py)" "$limit" python3 -m pytest -m gpu -q \
        -p no:cacheprovider -rfEs --tb=short "${@/#/tests/gpu/}"
}
pytest_file() {  # pytest_file SECONDS FILE[::TEST]...: one step per file
    local limit=$1 target; shift
    for target in "$@"; do pytest_ids "$limit" "$target"; done
}
for s in "$@"; do case $s in
  env) step env 120 bash -c 'nvidia-smi -L; python3 -c "import torch, triton, megatron.core as m; print(torch.__version__, triton.__version__, m.__version__, torch.cuda.get_device_name())"; python3 -c "import transformer_engine as te; print(\"te\", te.__version__)"; python3 -c "import mamba_ssm, causal_conv1d; print(\"mamba\", mamba_ssm.__version__)"' ;;
  gputests) pytest_file 200 test_grouped_experts_gpu.py test_plasticity_gpu.py test_stp_gpu.py test_checkpoints_gpu.py \
              test_gdn_gpu.py test_recipes_gpu.py test_nam56r_gpu.py::test_nam56r_quarter_builds_and_steps \
              test_bench_gpu.py test_model_gpu.py ;;
  gpu2tests) export DIST_TEST_DUMP_S=${DIST_TEST_DUMP_S:-200}  # stuck workers print stacks
        pytest_file 240 "test_plasticity_gpu.py::test_two_gpu_layouts_equal_one_gpu" \
              test_checkpoints_gpu.py::test_plugin_checkpoint_moves_tp_1_2_1_on_two_gpus \
              "test_stp_gpu.py::test_hook_equals_explicit_loss_under_tensor_parallel_2" \
              test_tensor_parallel_gpu.py ;;
  recipes) # every shipped recipe in its own pytest run (a slow first compile starves none)
        for name in bench_hybrid nam52 nam56r nam56r_lite nam56r_quarter tiny tiny_gdn; do
          PYTEST_ADDOPTS="-s ${PYTEST_ADDOPTS:-}" pytest_ids "${RECIPE_LIMIT:-400}" \
            "test_recipes_gpu.py::test_shipped_recipe_builds_and_steps_on_one_gpu[$name]"
        done ;;
  tests) step tests 480 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA ;;
  train) step train_embedded 300 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$LOGDIR/tiny_embedded.json"
         step train_mock 200 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --set data.source=mock --train-iters 60 --receipt "$LOGDIR/tiny_mock.json" ;;
  gdntrain) # G through the launcher, its log streamed here (the test's own log is in a tmp dir)
        step gdn_train 420 python3 -m megacpp_mcore.cli.main train tiny_gdn --device gpu --train-iters 20 --set training.log_interval=5 --receipt "$LOGDIR/tiny_gdn.json" ;;
  resume) rm -rf /tmp/ckpt
          step resume_first 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$LOGDIR/tiny_resume.json" -- --save /tmp/ckpt --save-interval 100 --exit-interval 100
          step resume_second 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --receipt "$LOGDIR/tiny_resume.json" -- --save /tmp/ckpt --save-interval 100 --load /tmp/ckpt ;;
  tp2) step tp2_tests 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/gpu/test_tensor_parallel_gpu.py "tests/gpu/test_model_gpu.py::test_te_and_local_agree"
       step tp2_train 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" --set parallel.tensor=2 --set parallel.sequence_parallel=true --train-iters 100 --receipt "$LOGDIR/tiny_tp2.json" ;;
  bench) step bench 540 python3 scripts/bench_layers.py --hidden 2048 4096 --families AEMFR --json "$LOGDIR/bench_layers.json" ;;
  rbench) step rbench 540 python3 scripts/bench_r_scan.py --quick --sweep --no-reference --json "$LOGDIR/r_sweep.json" ;;
  benchtests) step benchtests 400 python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests/gpu/test_bench_gpu.py ;;
  vsnative) step vsnative 580 python3 -m megacpp_mcore.cli.main bench --quick --budget-s 400 --json "$LOGDIR/bench_quick.json" ;;
  tune) # issue 13's next measurements: the fusions the plugin's launcher turns off, then
        # CUDA graphs and a larger micro-batch, each tuned run against native and plugin
        step tune_rope 300 python3 -m megacpp_mcore.cli.main bench --quick --families '' --budget-s 240 --tuned-config apply_rope_fusion=true --json "$LOGDIR/tune_rope.json"
        step tune_graphs 300 python3 -m megacpp_mcore.cli.main bench --quick --families '' --budget-s 240 --cuda-graphs attn,mamba,moe_router,moe_preprocess --tuned-micro-batch 4 --json "$LOGDIR/tune_graphs.json" ;;
  experts) # issue 13: the recipe's defaults (torch grouped-GEMM experts) against native, and
        # the tuned runs at micro-batch 4 (router fusion), with the host split; E family rows
        step vsexperts "${BENCH_LIMIT:-420}" python3 -m megacpp_mcore.cli.main bench --quick --families E --tuned-micro-batch 4 --budget-s "$(( ${BENCH_LIMIT:-420} - 120 ))" --json "$LOGDIR/bench_experts.json" ;;
  dense) # issue 13's dense row: E replaced by a 4096-wide MLP (F), plugin and native
        step dense 170 python3 -m megacpp_mcore.cli.main bench --quick --pattern AFMFAFMFAFMM --runs native,plugin --families '' --rounds 3 --budget-s 100 --json "$LOGDIR/bench_dense.json" ;;
  vsnative_r) step vsnative_r 580 python3 -m megacpp_mcore.cli.main bench --quick --pattern AEMEAEMEAEMR --families R --budget-s 400 --json "$LOGDIR/bench_r.json" ;;
  tier_a) step tier_a 520 python3 -m pytest -m gpu -q -p no:cacheprovider -rA --timeout 300 tests/gpu/test_model_gpu.py tests/gpu/test_m2rnn_scan_gpu.py tests/gpu/test_recipes_gpu.py tests/gpu/test_plasticity_gpu.py tests/gpu/test_stp_gpu.py tests/gpu/test_checkpoints_gpu.py tests/gpu/test_gdn_gpu.py ;;
  tier_b) step tier_b 420 python3 -m pytest -m gpu -q -p no:cacheprovider -rA --timeout 400 tests/gpu/test_nam56r_gpu.py tests/gpu/test_mamba3_gpu.py ;;
  features) rm -rf /tmp/ckA /tmp/ckB
        step features 200 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --receipt "$LOGDIR/features.json" -- --save /tmp/ckA --save-interval 30
        step feat_first 150 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --receipt "$LOGDIR/feat_resume.json" -- --save /tmp/ckB --save-interval 30 --exit-interval 30
        step feat_second 150 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --receipt "$LOGDIR/feat_resume.json" -- --load /tmp/ckB --save /tmp/ckB --save-interval 30 ;;
  quarter) step quarter 420 python3 -m megacpp_mcore.cli.main train nam56r_quarter --train-iters 30 --receipt "$LOGDIR/quarter.json" ;;
  tp2feat) step tp2feat 300 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --nproc 2 --set parallel.tensor=2 --set parallel.sequence_parallel=true --receipt "$LOGDIR/tp2feat.json" ;;
  dp2feat) step dp2feat 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --nproc 2 --receipt "$LOGDIR/dp2feat.json" ;;
  ep2feat) step ep2feat 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --nproc 2 --set parallel.expert=2 --set model.moe.token_dispatcher=alltoall --receipt "$LOGDIR/ep2feat.json" ;;
  fsdp2feat) step fsdp2feat 240 python3 -m megacpp_mcore.cli.main train "${TINY[@]}" "${FEAT[@]}" --nproc 2 --set parallel.distributed_optimizer=false --set parallel.fsdp=torch_fsdp2 --receipt "$LOGDIR/fsdp2feat.json" ;;
  benchfeat) step bench_stp 240 python3 scripts/bench_stp.py --models tiny mid --json "$LOGDIR/bench_stp.json"
        step bench_plasticity 240 python3 scripts/bench_plasticity.py --json "$LOGDIR/bench_plasticity.json" ;;
  test_*) IFS=, read -ra ids <<< "$s"  # test_a.py::x,test_b.py: one pytest run of those ids
        pytest_ids "${PYTEST_LIMIT:-300}" "${ids[@]}" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
printf '%s\n' "${verdicts[@]}" | tee "$LOGDIR/verdicts.txt"
tar czf "$OUT/$TAG.tgz" -C "$LOGDIR" . 2>/dev/null || true
