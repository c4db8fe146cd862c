"""benchmarks/dt_ablation.py at a toy budget: every run evaluated, the report complete, and a
second call reads the finished runs back instead of training them again."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _ablation(repo_root, out, *extra):
    command = [sys.executable, str(repo_root / "benchmarks" / "dt_ablation.py"), "--out", str(out),
               "--dts", "0", "0.3", "--seeds", "0", "1", "--steps", "8", "--eval-every", "4",
               "--eval-samples", "20", "--sampling-steps", "4", "--jobs", "2", *extra]
    return subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)


def test_ablation_reports_every_run_and_resumes(repo_root, tmp_path):
    out = tmp_path / "ablation"
    first = _ablation(repo_root, out)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((out / "dt_ablation.json").read_text())
    assert {(r["dt"], r["seed"]) for r in report["runs"]} == {(0.0, 0), (0.0, 1), (0.3, 0), (0.3, 1)}
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [4, 8]
        assert run["final"]["fid_synthetic"] > 0 and 0 <= run["final"]["class_accuracy"] <= 1
        assert (out / run["run_dir"] / "metrics.jsonl").exists()
        for part in ("texture", "semantic"):
            assert set(run["part_errors"][part]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
            assert all(error > 0 for error in run["part_errors"][part].values())
    # Only dt and the seed differ, so the two seeds of one dt are different models.
    by_run = {(r["dt"], r["seed"]): r["final"]["fid_synthetic"] for r in report["runs"]}
    assert by_run[(0.0, 0)] != by_run[(0.0, 1)] and by_run[(0.0, 0)] != by_run[(0.3, 0)]
    for dt in ("0", "0.3"):
        fids = [by_run[(float(dt), seed)] for seed in (0, 1)]
        summary = report["summary"][dt]["fid_synthetic"]
        assert summary["n"] == 2 and summary["mean"] == pytest.approx(sum(fids) / 2)
        assert summary["min"] == min(fids) and summary["max"] == max(fids)
    versus = report["versus_dt0"]["0.3"]["fid_synthetic"]
    assert versus["difference"] == pytest.approx(report["summary"]["0.3"]["fid_synthetic"]["mean"]
                                                 - report["summary"]["0"]["fid_synthetic"]["mean"])
    for plot in ("fid_vs_dt.png", "fid_vs_step.png", "part_errors.png"):
        assert (out / plot).stat().st_size > 0

    logs = {path: path.read_text() for path in (out / "runs").glob("*/train.log")}
    again = _ablation(repo_root, out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "done" not in again.stdout  # nothing trained again
    assert {path: path.read_text() for path in logs} == logs
    assert json.loads((out / "dt_ablation.json").read_text())["runs"] == report["runs"]


def test_ablation_rejects_a_budget_that_misses_the_last_evaluation(repo_root, tmp_path):
    result = _ablation(repo_root, tmp_path / "ablation", "--eval-every", "3")
    assert result.returncode == 2 and "multiple of --eval-every" in result.stderr
