"""libero-eval-compare on crafted results files whose counts and p-values are known."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from libero_eval.results import summary_document, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
COMPARE = Path(sys.executable).with_name("libero-eval-compare")  # the console command the venv installed
PROTOCOL = {"suite": "libero_spatial", "num_steps_wait": 10, "max_steps": 220, "replan_steps": 5, "obs_mode": "state",
            "image_size": 224, "camera_size": 256, "seed": 7}  # fmt: skip
VERSIONS = {"mujoco": "3.17.0", "robosuite": "1.4.0", "libero": "0.1.1"}


def write_run(path: Path, successes: dict[tuple[int, int], bool | str], quant: str = "fp", latency_ms: float = 10.0,
              protocol: dict | None = None, versions: dict | None = None) -> Path:  # fmt: skip
    """A results file as the harness writes it, from (task, init state) -> success, or an error message."""
    episodes = [{"suite": "libero_spatial", "task_id": t, "task": f"task {t}", "episode": e, "init_state": e,
                 "success": ok is True, "error": ok if isinstance(ok, str) else None, "wall_s": 1.0,
                 "call_latencies_ms": [latency_ms], "env_step_ms": [1.0]}
                for (t, e), ok in successes.items()]  # fmt: skip
    header = {"run_id": path.stem, "policy": {"name": "embedded"}, "quant": {"mode": quant, "w_bits": 4, "a_bits": 8},
              "protocol": {**PROTOCOL, **(protocol or {})}, "versions": {**VERSIONS, **(versions or {})},
              "memory": {"peak_rss_mb": 1000.0 + latency_ms, "cuda_max_allocated_mb": None}}  # fmt: skip
    path.write_text(json.dumps(summary_document(header, episodes, "complete", 5.0)))
    return path


# Baseline and candidate on the same 20 episodes (tasks 0 and 1, init states 0-9), and one the baseline lacks:
# the baseline alone succeeds on 2 of the shared episodes (b), the candidate alone on 8 (c).
BASE = {(t, e): e < 5 or (t == 0 and e == 9) for t in (0, 1) for e in range(10)}
CANDIDATE = {**{(t, e): e < 5 or e >= 5 + (t == 0) for t in (0, 1) for e in range(10)}, (0, 0): False, (1, 1): False,
             (2, 0): True}  # fmt: skip


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMPARE), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    return write_run(tmp_path / "base.json", BASE), write_run(tmp_path / "cand.json", CANDIDATE, "duquant", 20.0)


def test_counts_intervals_and_mcnemar_match_scipy(pair):
    proc = compare(*map(str, pair), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    base, cand = result["overall"]
    assert (base["successes"], base["episodes"]) == (11, 20) and (cand["successes"], cand["episodes"]) == (18, 21)
    assert cand["ci95"] == pytest.approx(wilson_interval(18, 21))
    assert cand["delta_pts"] == pytest.approx((18 / 21 - 11 / 20) * 100)
    # Task 2 exists in the candidate only: not paired, no delta.
    task2 = result["tasks"][2]
    assert task2["task_id"] == 2 and task2["runs"][0]["episodes"] == 0 and task2["runs"][1]["delta_pts"] is None
    mcnemar = result["mcnemar"][1]
    assert (mcnemar["shared"], mcnemar["baseline_only"], mcnemar["other_only"]) == (20, 2, 8)
    assert mcnemar["p_value"] == pytest.approx(stats.binomtest(2, 10, 0.5).pvalue)
    assert mcnemar["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # two-sided: 2 P(X <= 2), X ~ Bin(10, 1/2)
    assert result["runs"][1]["latency_ms"]["p50"] == 20.0 and result["runs"][1]["memory"]["peak_rss_mb"] == 1020.0


def test_table_markdown_and_csv_show_the_same_numbers(pair):
    p = stats.binomtest(2, 10, 0.5).pvalue
    table = compare(*map(str, pair)).stdout
    assert "55.0% (11/20)" in table and "85.7% (18/21)" in table and "+30.7 pts" in table
    assert f"b=2 c=8 of 20, p={p:.3g}" in table and "x2.00" in table  # latency 20 ms vs 10 ms
    markdown = compare(*map(str, pair), "--format", "markdown").stdout.splitlines()
    assert markdown[1].startswith("| --- |") and any(line.startswith("| overall | 55.0% (11/20)") for line in markdown)
    rows = list(csv.DictReader(io.StringIO(compare(*map(str, pair), "--format", "csv").stdout)))
    overall = [row for row in rows if row["suite"] == "overall"]
    assert [(r["successes"], r["episodes"]) for r in overall] == [("11", "20"), ("18", "21")]
    assert float(overall[1]["mcnemar_p"]) == pytest.approx(p) and overall[0]["mcnemar_p"] == ""


def test_refuses_different_protocols_unless_forced(tmp_path, pair):
    other = write_run(tmp_path / "short.json", CANDIDATE, protocol={"max_steps": 100, "obs_mode": "rgb"})
    proc = compare(str(pair[0]), str(other))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "max_steps (220 vs 100)" in proc.stderr and "obs_mode" in proc.stderr
    assert compare(str(pair[0]), str(other), "--force").returncode == 0


def test_warns_when_simulator_versions_differ(tmp_path, pair):
    other = write_run(tmp_path / "old.json", CANDIDATE, versions={"mujoco": "2.3.7"})
    proc = compare(str(pair[0]), str(other))
    assert proc.returncode == 0 and "warning: simulator versions differ: mujoco 2.3.7 vs 3.17.0" in proc.stderr


def test_unreadable_file_is_one_line(tmp_path, pair):
    (tmp_path / "broken.json").write_text("{")
    proc = compare(str(pair[0]), str(tmp_path / "broken.json"))
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: cannot read results file")
        and "Traceback" not in proc.stderr
    )


def test_plot_writes_a_png(tmp_path, pair):
    out = tmp_path / "success.png"
    assert compare(*map(str, pair), "--plot", str(out)).returncode == 0
    from matplotlib.image import imread

    image = imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("where, message", [("missing/success.png", "is not a folder this user can write into"),
                                             ("success.jpg", "--plot writes .png, .pdf, .svg")])  # fmt: skip
def test_a_plot_that_cannot_be_written_is_refused_in_one_line(tmp_path, pair, where, message):
    proc = compare(*map(str, pair), "--plot", str(tmp_path / where))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and not proc.stdout  # refused before the comparison is printed


def test_errored_episodes_are_refused_then_left_out_with_force(tmp_path, pair):
    """An episode whose policy call raised is no policy failure: counting it as one would fake a quantization loss."""
    base, _ = pair
    broken = {**BASE, (0, 1): "TypeError: ufunc 'right_shift' not supported", (1, 0): "WorkerCrashed: exit -9"}
    cand = write_run(tmp_path / "broken.json", broken, "duquant")
    refused = compare(str(base), str(cand))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "2 of 20 episodes errored" in refused.stderr and "--force" in refused.stderr

    forced = compare(str(base), str(cand), "--force", "--format", "json")
    assert forced.returncode == 0, forced.stderr
    result = json.loads(forced.stdout)
    overall = result["overall"][1]
    # (0, 1) and (1, 0) were successes in BASE: as errors they count in neither rate nor McNemar.
    assert (overall["episodes"], overall["evaluated"], overall["errored"], overall["successes"]) == (20, 18, 2, 9)
    assert result["mcnemar"][1] == {"shared": 18, "baseline_only": 0, "other_only": 0, "p_value": 1.0}
    assert any("2 of 20 episodes errored" in w for w in result["warnings"])
    table = compare(str(base), str(cand), "--force")
    assert "(9/18)" in table.stdout and "+2 errored" in table.stdout
