"""Records under concurrent writers: the workers of a parallel sweep append to one runs.jsonl and take
turns on named locks (qbench/records.py)."""

import json
import multiprocessing as mp
import time

from qbench.records import append_record, locked, read_records

WRITERS, EACH = 8, 200


def _append_many(results_dir: str, writer: int) -> None:
    for i in range(EACH):
        # sizes on both sides of PIPE_BUF (4096): a large write is atomic only through the lock
        append_record(results_dir, {"run_id": f"{writer}-{i}", "payload": "x" * (100 + 97 * i)})


def _read_while_writing(results_dir: str, seen, garbled) -> None:
    from qbench import records

    for _ in range(50):
        seen.append(len(read_records(results_dir)))
    garbled.append(len(records._WARNED))  # lines it skipped as not JSON: a half-written one would be here


def test_eight_writers_lose_no_record_and_interleave_none(tmp_path):
    manager = mp.Manager()
    seen, garbled = manager.list(), manager.list()
    procs = [mp.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(WRITERS)]
    procs.append(mp.Process(target=_read_while_writing, args=(str(tmp_path), seen, garbled)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == WRITERS * EACH
    ids = [json.loads(line)["run_id"] for line in lines]  # every line one whole JSON record
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(WRITERS) for i in range(EACH))
    assert list(seen) == sorted(seen) and list(garbled) == [0]  # a reader meanwhile saw whole records only


def _measure_once(results_dir: str) -> None:
    """What a worker needing the baseline does: under the lock, read the records, measure only if missing."""
    with locked(results_dir, "baseline-key"):
        if not any(r.get("role") == "baseline" for r in read_records(results_dir)):
            time.sleep(0.2)  # the measurement: long enough for every other worker to be waiting
            append_record(results_dir, {"run_id": "baseline", "role": "baseline"})
    append_record(results_dir, {"run_id": "run", "role": None})


def test_workers_starting_together_measure_the_baseline_once(tmp_path):
    procs = [mp.Process(target=_measure_once, args=(str(tmp_path),)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    records = read_records(tmp_path)
    assert [r["role"] for r in records].count("baseline") == 1
    assert len(records) == 7
