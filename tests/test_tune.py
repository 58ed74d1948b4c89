"""The kernel autotuner's choice logic (kernels/tune.py), with the GPU timing replaced by a fake:
the fastest config wins, configs that run out of GPU resources are skipped, a call that cannot be
captured in a CUDA graph is timed eagerly, and any other error is raised."""

import pytest

pytest.importorskip("triton")

from qbench.kernels import tune  # noqa: E402


class OutOfResources(Exception):
    pass


def test_fastest_wins_and_out_of_resources_is_skipped(monkeypatch):
    times = {1: 0.3, 2: 0.1, 3: None, 4: 0.2}

    current = {}

    def run(config):
        if times[config["id"]] is None:
            raise OutOfResources("out of resource: shared memory")
        current["ms"] = times[config["id"]]

    monkeypatch.setattr(tune, "gpu_time_ms", lambda fn, **_: (fn(), current["ms"])[1])
    chosen = tune._tune("k", (1,), [{"id": i} for i in times], run)
    assert chosen == {"id": 2}
    with pytest.raises(RuntimeError, match="no config"):
        tune._tune("k", (1,), [{"id": 3}], run)


def test_capture_failure_falls_back_to_eager_timing(monkeypatch):
    import triton

    def no_capture(fn, **_):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(tune, "gpu_time_ms", no_capture)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **_: (fn(), {1: 0.5, 2: 0.2}[last["id"]])[1])
    last = {}
    assert tune._tune("k", (1,), [{"id": 1}, {"id": 2}], lambda c: last.update(c)) == {"id": 2}

    def broken(config):
        raise ValueError("a real bug")
    with pytest.raises(ValueError, match="a real bug"):
        tune._tune("k", (1,), [{"id": 1}], broken)


def test_m_bucket():
    assert [tune.m_bucket(m) for m in (1, 2, 3, 16, 17, 5000)] == [1, 2, 4, 16, 32, 4096]


def test_config_that_does_not_compile_is_skipped_with_a_warning(monkeypatch):
    class FakeCompilationError(Exception):
        pass

    def run(config):
        if config["id"] == 1:
            raise FakeCompilationError("unsupported layout conversion")
    monkeypatch.setattr(tune, "gpu_time_ms", lambda fn, **_: (fn(), 0.1)[1])
    monkeypatch.setattr(tune, "_compile_error", lambda err: isinstance(err, FakeCompilationError))
    with pytest.warns(UserWarning, match="does not compile here, skipped: unsupported layout"):
        assert tune._tune("k", (1,), [{"id": 1}, {"id": 2}], run) == {"id": 2}


def test_tuning_frees_the_flush_buffer(monkeypatch):
    monkeypatch.setitem(tune._FLUSH, 0, ("256 MiB buffer", "graph", 8))
    monkeypatch.setattr(tune, "gpu_time_ms", lambda fn, **_: (fn(), 0.1)[1])
    tune._tune("k", (1,), [{"id": 1}], lambda c: None)
    assert tune._FLUSH == {}


def test_candidate_with_a_wrong_result_is_skipped(monkeypatch):
    """A fast config whose output disagrees with the simplest config's (the last of the list) never wins."""
    import torch

    outputs = {1: torch.ones(4) * 2, 2: torch.ones(4) * (1 + 1e-4), 3: torch.ones(4)}
    times = {1: 0.01, 2: 0.2, 3: 0.3}
    current = {}

    def run(config):
        current["ms"] = times[config["id"]]
        return outputs[config["id"]]
    monkeypatch.setattr(tune, "gpu_time_ms", lambda fn, **_: (fn(), current["ms"])[1])
    with pytest.warns(UserWarning, match="disagrees"):
        assert tune._tune("k", (1,), [{"id": i} for i in (1, 2, 3)], run) == {"id": 2}
    outputs[1] = torch.full((4,), float("nan"))
    with pytest.warns(UserWarning, match="disagrees"):
        assert tune._tune("k", (1,), [{"id": i} for i in (1, 2, 3)], run) == {"id": 2}
