# Source on the GPU machine (see ../shared/GPU.md): qbench installed from the carried tree, wheels on
# PYTHONPATH, the default model's GGUF file and the data root from the carried .devcache/.
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
export QBENCH_SMOLLM2_GGUF=/root/qcache/SmolLM2-135M-Instruct.Q4_1.gguf
export QBENCH_DATA_DIR=$PWD/.devcache/data QBENCH_CACHE_DIR=/root/qcache/qbench
# the copied tree has no .git: record the commit it was sent from (set QBENCH_GIT_SHA before the call)
export QBENCH_GIT_SHA=${QBENCH_GIT_SHA:-$(cat .devcache/git-sha 2>/dev/null)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "qbench install failed"
