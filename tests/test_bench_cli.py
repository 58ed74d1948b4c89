"""The kernel benchmark's command line fails fast, in one line, on a bad shape list (before any GPU check)."""

import pytest

pytest.importorskip("triton")


def test_bad_shapes_argument_is_one_line_error(capsys):
    from qbench.bench.kernels import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--shapes", "4096by4096"])
    assert exit_info.value.code == 2
    assert "use all, big, rest or KxN" in capsys.readouterr().err
