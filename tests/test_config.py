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


@pytest.mark.parametrize("arg", ["method=nosuch", "bits=11"])
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
