"""Impossible configs fail in one line before any model is loaded (and before torch is imported)."""

import subprocess
import sys

import pytest

from qbench import ConfigError
from qbench.cli import prevalidate


@pytest.mark.parametrize("argv,needle", [
    (["method=nosuch"], "unknown method 'nosuch'; valid:"),
    (["bits=11"], "does not support bits=11; valid: 2, 3, 4"),
    (["group_size=0"], "group_size must be -1"),
    (["model=nosuch"], "unknown model 'nosuch'"),
    (["model=/no/such/file.gguf"], "does not exist"),
    (["eval.ppl.datasets=[nosuch]"], "unknown perplexity dataset 'nosuch'; valid: wikitext2, c4"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["calib=nosuch"], "unknown calib 'nosuch'"),
    (["calib.nsamples=0"], "calib.nsamples must be >= 1"),
    (["-m", "method=rtn", "bits=3,11"], "bits=11"),
    (["nosuchkey=1"], "nosuchkey"),
])
def test_bad_values_fail_fast_with_one_line(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_sweep_passes():
    prevalidate(["-m", "method=rtn,fp16", "bits=3,4", "group_size=-1,64"])


@pytest.mark.parametrize("arg", ["method=nosuch", "bits=11", "eval.ppl.max_windows=abc", "method.sym=maybe",
                                 "data_dir=/no/such/data/root"])
def test_cli_exits_nonzero_with_one_line_without_torch(arg, tmp_path):
    code = (
        "import sys; sys.argv=['qbench', %r]\n"
        "from qbench.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n    assert 'torch' not in sys.modules, 'torch imported'\n    raise\n" % arg
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("qbench: error:"), out.stderr


def test_skip_reason_for_baseline_with_bits(cfg_factory):
    from qbench.config import skip_reason

    assert "takes no bit width" in skip_reason(cfg_factory("method=fp16", "bits=3"))
    assert skip_reason(cfg_factory("method=fp16")) is None
    assert skip_reason(cfg_factory("method=rtn", "bits=3")) is None


# ---- issue 29: every value below was found only after the model loaded (or crashed the validator) ----

@pytest.mark.parametrize("argv,needle", [
    (["method=int8", "method.threshold=abc"], "method.threshold for int8 must be a number (default 6.0), got 'abc'"),
    (["method=awq", "method.n_grid=2.5"], "method.n_grid for awq must be an integer (default 20), got 2.5"),
    (["eval.ppl.max_windows=abc"], "eval.ppl.max_windows must be an integer >= 1 or null, got 'abc'"),
    (["eval.ppl.seqlen=1.5"], "eval.ppl.seqlen must be an integer >= 2"),
    (["seed=x"], "seed must be an integer, got 'x'"),
])
def test_wrong_types_fail_in_one_line_before_load(argv, needle):
    with pytest.raises(ConfigError) as err:
        prevalidate(argv)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_int8_threshold_accepts_an_integer_for_a_number():
    prevalidate(["method=int8", "method.threshold=2"])


def _number_keys():
    """(method, key) of every number-valued option without choices in conf/method/*.yaml."""
    from qbench.paths import group_options
    from qbench.records import method_params
    from qbench.sweep import method_meta

    for name in group_options("method"):
        meta = method_meta(name)
        for key, default in method_params({"config": {"method": meta}}).items():
            if key not in (meta.get("choices") or {}) and isinstance(default, (int, float)) and not isinstance(default, bool):
                yield name, key


@pytest.mark.parametrize("method,key", list(_number_keys()))
def test_every_number_option_of_a_method_is_type_checked(method, key):
    """The check is generic, from the method's YAML: no per-method code."""
    with pytest.raises(ConfigError, match=rf"method\.{key} for {method} must be"):
        prevalidate([f"method={method}", f"method.{key}=abc"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_before_load(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qbench.cli", "device=cuda"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("qbench: error: device=cuda but no CUDA device") and "device=cpu" in lines[0]
    assert not (tmp_path / "results").exists()  # nothing ran, nothing recorded


def test_empty_data_root_names_the_missing_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        prevalidate([f"data_dir={tmp_path}"])
    message = str(err.value)
    assert f"data root {tmp_path} lacks wikitext-2-raw/wiki.test.raw" in message and "c4/c4_validation_2k.parquet" in message
    assert "\n" not in message


def test_data_root_only_needs_the_files_of_the_run(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n")
    prevalidate([f"data_dir={tmp_path}", "eval.ppl.datasets=[wikitext2]"])  # rtn: no calibration, no C4
    with pytest.raises(ConfigError, match="lacks c4/c4_validation_2k.parquet \\(for calib=c4\\)"):
        prevalidate([f"data_dir={tmp_path}", "eval.ppl.datasets=[wikitext2]", "method=gptq"])


def test_no_data_root_and_no_network_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv("QBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        prevalidate([])
    message = str(err.value)
    assert message.startswith("no data root set and the Hugging Face hub is unreachable")
    assert "QBENCH_DATA_DIR=" in message and "data_dir=" in message and "\n" not in message


def test_fp4_derives_from_nf4(cfg_factory):
    """conf/method/fp4.yaml holds only what differs from nf4.yaml (Hydra defaults): composed, the two
    entries differ in their name only, and method_meta (sweep plans, method variants) sees the same."""
    from omegaconf import OmegaConf

    from qbench.paths import method_meta

    fp4 = OmegaConf.to_container(cfg_factory("method=fp4").method)
    nf4 = OmegaConf.to_container(cfg_factory("method=nf4").method)
    assert fp4 == {**nf4, "name": "fp4"} and nf4["name"] == "nf4"
    assert method_meta("fp4") == fp4 and method_meta("nf4") == nf4
    assert fp4["group_sizes"] == [32, 64, 128, 256, 512, 1024, 2048, 4096] and fp4["double_quant"] is True
