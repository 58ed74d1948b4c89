"""`qbench report --gptq-awq-table`: the issue-3 table (RTN / GPTQ / AWQ on WikiText-2), formerly
`python -m qbench.bench.gptq_awq_table`, byte for byte what that command wrote."""

from pathlib import Path

from qbench.report import main

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "reports" / "smollm2-135m" / "records" / "h100-speed-check.jsonl"
# The output of `python -m qbench.bench.gptq_awq_table` on RECORDS (before the move into qbench report).
EXPECTED = "\n".join([
    '| method | bits | group size | act-order | calib | WikiText-2 ppl | Δ vs fp16 | C4 ppl | quantize s | device |',
    '|---|---|---|---|---|---|---|---|---|---|',
    '| fp16 | - | - | - | - | 24.145 | - | - | 0.0 | NVIDIA H100 80GB HBM3 |',
    '| rtn | 4 | 128 | - | - | 33.866 | +9.721 | - | 1.1 | NVIDIA H100 80GB HBM3 |',
])


def test_gptq_awq_table_is_the_former_command_s_output(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main(["--results", str(RECORDS), "--gptq-awq-table", "--out", str(out)]) == 0
    assert capsys.readouterr().out == EXPECTED + "\n"
    assert out.read_text() == EXPECTED + "\n"
    assert not (RECORDS.parent / "reports").exists()  # no leaderboards with this option


def test_gptq_awq_table_of_the_published_records_is_the_committed_table(tmp_path):
    """reports/gptq_awq_table.md is the table of the group-64/no-act-order records plus the leaderboard's rows."""
    out = tmp_path / "table.md"
    records = REPO / "reports" / "smollm2-135m" / "records"
    joined = tmp_path / "runs.jsonl"
    joined.write_text((records / "gpu-leaderboard.jsonl").read_text() + (records / "gpu-gptq-awq-ppl.jsonl").read_text())
    assert main(["--results", str(joined), "--gptq-awq-table", "--out", str(out)]) == 0
    assert out.read_text() == (REPO / "reports" / "gptq_awq_table.md").read_text()
