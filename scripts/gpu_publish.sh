#!/usr/bin/env bash
# The published GPU figures in one batch (reports/ and README): run on the GPU machine from the repo
# root after `source scripts/gpu_env.sh`, with OUT set to a folder that survives the call.
#     OUT=/tmp/out bash scripts/gpu_publish.sh [leaderboard|g64|noact|formats|gguf|int8t]...
# Parts, in priority order (each a named sweep or multirun; records go to $OUT/<part>/runs.jsonl):
#   leaderboard  sweeps/gpu.yaml: every method at 4 bits, RTN/GPTQ/AWQ at 3 too, group size 128,
#                WikiText-2 + C4, KLD, speed, VRAM, cost on hardware=$HARDWARE (default h100)
#   g64          RTN/GPTQ(act-order)/AWQ at bits 3,4, group size 64 (issue 3's table), ppl only
#   noact        GPTQ without act-order at bits 3,4, group sizes 128, 64 (issue 3's table), ppl only
#   formats      sweeps/formats.yaml: LLM.int8()/NF4/FP4/FP8 variants, ppl only
#   gguf         GGUF block types and mixes, ppl only ($GGUF_TYPES: a comma list, default all 13)
#   zeroshot     sweeps/gpu.yaml with perplexity and the seven zero-shot tasks only (KLD and speed off)
#   identity     research/tasks_identity.py on the fp16 model, full splits: qbench's task numbers vs
#                lm-eval's own simple_evaluate on the same model object and files ($OUT/identity.json)
#   zeroshot-par the zeroshot part's 13 quantized configs (all but fp16 and gguf, published before) as three
#                multiruns on hydra/launcher=gpus at once, $ZS_JOBS workers each (default 4) sharing the GPU:
#                accuracy only (tasks_s of concurrent workers is no per-config speed figure)
#   shape8b      sweeps/gpu-8b.yaml (shape:llama-3-8b, every method; quantize time and memory, served speed,
#                prefill 2048/8192) on hardware=$HARDWARE, resumable
#   kerneltests  the kernel and quantized-layer tests compiled on the GPU (not the interpreter): $OUT/kerneltests.log
#   zeroshot-rest the zeroshot part's configs the 2026-12-04 run lost to out-of-memory, and the new FP4 formats:
#                GPTQ/AWQ/HQQ at 3/4 bits, RTN w4, FP4, MXFP4, NVFP4 (seed $OUT/zeroshot/runs.jsonl with the fp16
#                record so its baseline is reused), two multiruns on hydra/launcher=gpus with $ZS_JOBS_INT (3) + $ZS_JOBS_FP4 (2) workers; accuracy only
#   served       sweeps/gpu.yaml without the zero-shot tasks (perplexity, KLD, served speed, VRAM, cost) on
#                hardware=$HARDWARE, resumable: the run alone on the GPU, so its speed and eval_*_s figures hold
#   served-new   the served part's configs never measured on a GPU before, as multiruns into $OUT/served (same
#                records as the sweep's): fp16 and RTN w4 with kv_cache=none|int8|fp8, HQQ w4, MXFP4, NVFP4, SmoothQuant
#   int8t        LLM.int8() at outlier thresholds $INT8_THRESHOLDS (default 5,4,3,2,1), ppl and outlier
#                fractions: how the perplexity loss trades against the share of 16-bit columns
set -uo pipefail
OUT=${OUT:?set OUT}
PPL=(model=smollm2-135m device=cuda "eval.ppl.datasets=[wikitext2,c4]" quiet=true wandb.mode=disabled)
CALIB=(calib=c4 calib.nsamples=128 calib.seqlen=null calib.seed=0)
qb() { python3 -m qbench.cli "$@"; }
ZSR=(model=smollm2-135m device=cuda "eval.ppl.datasets=[wikitext2,c4]" quiet=true wandb.mode=disabled
     "eval.tasks=[arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq,lambada_openai]" eval.tasks_batch_size=64
     eval.kld=false eval.speed=false eval.kld_windows=8 "hardware=${HARDWARE:-h100}" "results_dir=$OUT/zeroshot"
     hydra/launcher=gpus resume=true)
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(leaderboard g64 noact formats gguf)
for part in "${parts[@]}"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    leaderboard) qb sweep sweeps/gpu.yaml "results_dir=$OUT/leaderboard" "hardware=${HARDWARE:-h100}" wandb.mode=disabled ;;
    g64) qb -m method=rtn,gptq,awq bits=3,4 group_size=64 method.sym=false "${CALIB[@]}" "${PPL[@]}" "results_dir=$OUT/g64" ;;
    noact) qb -m method=gptq bits=3,4 group_size=128,64 method.act_order=false "${CALIB[@]}" "${PPL[@]}" "results_dir=$OUT/g64" ;;
    formats) qb sweep sweeps/formats.yaml "results_dir=$OUT/formats" wandb.mode=disabled ;;
    gguf) qb -m method=gguf method.type=${GGUF_TYPES:-Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q3_K_M,Q4_K_M,Q5_K_M} "${PPL[@]}" "results_dir=$OUT/gguf" ;;
    zeroshot) qb sweep sweeps/gpu.yaml "results_dir=$OUT/zeroshot" "hardware=${HARDWARE:-h100}" wandb.mode=disabled \
                eval.kld=false eval.speed=false ;;
    zeroshot-par)
      ZS=(model=smollm2-135m device=cuda "eval.ppl.datasets=[wikitext2,c4]" quiet=true wandb.mode=disabled
          "eval.tasks=[arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq,lambada_openai]" eval.tasks_batch_size=64
          eval.kld=false eval.speed=false eval.kld_windows=8 "hardware=${HARDWARE:-h100}" "results_dir=$OUT/zeroshot"
          hydra/launcher=gpus "hydra.launcher.n_jobs=${ZS_JOBS:-4}" resume=true)
      qb -m method=rtn,gptq,awq,hqq bits=3,4 "${ZS[@]}" > "$OUT/zs-int.log" 2>&1 &
      qb -m method=nf4,fp4 bits=4 "${ZS[@]}" > "$OUT/zs-nf4.log" 2>&1 &
      qb -m method=int8,fp8,smoothquant bits=8 "${ZS[@]}" > "$OUT/zs-w8.log" 2>&1 &
      wait; tail -n 3 "$OUT"/zs-*.log ;;
    kerneltests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_formats.py \
                  tests/test_gguf_kernel.py tests/test_wint_mma.py tests/test_hqq.py tests/test_fp4_blocks.py \
                  tests/test_kvcache.py tests/test_smoothquant.py > "$OUT/kerneltests.log" 2>&1
                tail -n 5 "$OUT/kerneltests.log" ;;
    zeroshot-rest)
      qb -m method=gptq,awq,hqq bits=3,4 "${ZSR[@]}" "hydra.launcher.n_jobs=${ZS_JOBS_INT:-3}" > "$OUT/zs-int.log" 2>&1 &
      qb -m method=rtn,fp4,mxfp4,nvfp4 bits=4 "${ZSR[@]}" "hydra.launcher.n_jobs=${ZS_JOBS_FP4:-2}" > "$OUT/zs-fp4.log" 2>&1 &
      wait; tail -n 3 "$OUT"/zs-*.log ;;
    zeroshot-w4)  # zeroshot-rest's 4-bit integer configs and FP4 in one round of five workers
      qb -m method=rtn,gptq,awq,hqq,fp4 bits=4 "${ZSR[@]}" hydra.launcher.n_jobs=5 > "$OUT/zs-w4.log" 2>&1 ;;
    served) qb sweep sweeps/gpu.yaml "results_dir=$OUT/served" "hardware=${HARDWARE:-h100}" wandb.mode=disabled \
              "eval.tasks=[]" resume=true ;;
    served-new)
      SV=(model=smollm2-135m device=cuda "eval.ppl.datasets=[wikitext2,c4]" eval.kld=true eval.speed=true
          eval.speed_opts.new_tokens=64 eval.speed_opts.repeats=3 "eval.speed_opts.batch_sizes=[1,32]" eval.kld_windows=8
          quiet=true wandb.mode=disabled "hardware=${HARDWARE:-h100}" "results_dir=$OUT/served" resume=true)
      qb -m method=fp16 kv_cache=none,int8,fp8 "${SV[@]}"
      qb -m method=hqq,mxfp4,nvfp4 bits=4 "${SV[@]}"
      qb -m method=smoothquant bits=8 "${SV[@]}"
      qb -m method=rtn bits=4 kv_cache=int8,fp8 "${SV[@]}" ;;
    shape8b) qb sweep sweeps/gpu-8b.yaml "results_dir=$OUT/gpu-8b" "hardware=${HARDWARE:-h100}" wandb.mode=disabled resume=true ;;
    identity) python3 research/tasks_identity.py --device cuda --dtype float16 --limit 0 --batch-size 64 \
                --out "$OUT/identity.json" ;;
    int8t) qb -m method=int8 "method.threshold=${INT8_THRESHOLDS:-5.0,4.0,3.0,2.0,1.0}" "${PPL[@]}" "results_dir=$OUT/int8t" ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
