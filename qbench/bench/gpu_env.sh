# Source on the GPU machine (see ../shared/GPU.md): qbench installed from the carried tree, wheels on
# PYTHONPATH, the default model's GGUF file and the data root from the carried .devcache/.
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
export QBENCH_SMOLLM2_GGUF=/root/qcache/SmolLM2-135M-Instruct.Q4_1.gguf
export QBENCH_DATA_DIR=$PWD/.devcache/data QBENCH_CACHE_DIR=/root/qcache/qbench
# The copied tree has no .git: export QBENCH_GIT_SHA=<commit> in the call to record the commit it came from.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "qbench install failed"
