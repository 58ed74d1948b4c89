#!/usr/bin/env bash
# Issue 3's GPU table: SmolLM2-135M, full WikiText-2 test (2048-token windows), C4 calibration
# (128 x 2048 for GPTQ, 128 x 512 for AWQ: calib.seqlen=null takes the method's default), asymmetric
# grids, bits 3 and 4, group sizes 128 (last group of the 576-wide layers partial) and 64.
# On the GPU machine, from the repo root after `source qbench/bench/gpu_env.sh`:
#     bash qbench/bench/gptq_awq_table.sh [rtn|gptq|gptq-noact|awq|table|all]
# Each part is one qbench multirun (a few minutes); `table` writes reports/gptq_awq_table.md.
set -euo pipefail
RESULTS=${RESULTS:-results/gptq_awq}
COMMON=(model=smollm2-135m "eval.ppl.datasets=[wikitext2]" eval.ppl.seqlen=2048 eval.ppl.max_windows=null
        quiet=true wandb.mode=disabled "results_dir=$RESULTS" bits=3,4 group_size=128,64)
CALIB=(calib=c4 calib.nsamples=128 calib.seqlen=null calib.seed=0)
part=${1:-all}
run() { python3 -m qbench.cli -m "$@" "${COMMON[@]}"; }
case $part in rtn|all) run method=rtn method.sym=false ;; esac
case $part in gptq|all) run method=gptq method.sym=false method.act_order=true "${CALIB[@]}" ;; esac
case $part in gptq-noact|all) run method=gptq method.sym=false method.act_order=false "${CALIB[@]}" ;; esac
case $part in awq|all) run method=awq method.sym=false "${CALIB[@]}" ;; esac
case $part in table|all) python3 -m qbench.bench.gptq_awq_table "$RESULTS" --out reports/gptq_awq_table.md ;; esac
