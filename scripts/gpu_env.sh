# Source on the GPU machine from the repo root (see ../shared/GPU.md): qbench installed from the carried
# tree, wheels on PYTHONPATH, the default model's GGUF file and the data root from the carried .devcache/.
#     source scripts/gpu_env.sh
# Machine-specific locations, each an environment variable (default: the GPU machine's current layout):
#   QBENCH_GPU_SITE    folder of the carried wheels, put first on PYTHONPATH   (default /root/site)
#   QBENCH_GPU_CACHE   qbench's cache and the default model's GGUF file        (default /root/qcache)
#   QBENCH_SMOLLM2_GGUF  the GGUF file itself          (default $QBENCH_GPU_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf)
#   QBENCH_DATA_DIR    the data root                                           (default $PWD/.devcache/data)
#   QBENCH_CACHE_DIR   qbench's caches                                         (default $QBENCH_GPU_CACHE/qbench)
QBENCH_GPU_SITE=${QBENCH_GPU_SITE:-/root/site}
QBENCH_GPU_CACHE=${QBENCH_GPU_CACHE:-/root/qcache}
export PYTHONPATH=$QBENCH_GPU_SITE${PYTHONPATH:+:$PYTHONPATH}
export QBENCH_SMOLLM2_GGUF=${QBENCH_SMOLLM2_GGUF:-$QBENCH_GPU_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf}
export QBENCH_DATA_DIR=${QBENCH_DATA_DIR:-$PWD/.devcache/data} QBENCH_CACHE_DIR=${QBENCH_CACHE_DIR:-$QBENCH_GPU_CACHE/qbench}
# The copied tree has no .git: export QBENCH_GIT_SHA=<commit> in the call to record the commit it came from.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "qbench install failed"
