"""scripts/bench_calibration.py --quick end to end: real LIBERO observations, real calibrations, the JSON it writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_calibration.py"


def test_quick_bench_writes_one_row_per_token_value(tmp_path):
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--set", "smooth_alpha=0.5", "--heldout-calls", "3",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    header, rows = doc["header"], doc["rows"]

    assert header["threads"] == 1 and header["config"]["mode"] == "duquant"
    assert header["config"]["smooth_alpha"] == 0.5 and header["settings"] == {"smooth_alpha": 0.5}
    assert (header["config"]["w_bits"], header["config"]["a_bits"]) == (4, 8)
    assert not set(header["calibration"]["init_states"]) & set(header["held_out"]["init_states"])
    # No episode succeeds within 10 steps: each held-out episode gives 3 observations, its start and 2 later ones.
    held_out = header["held_out"]
    assert held_out["observations"] == 3 * len(held_out["init_states"]) * len(header["tasks"])
    assert header["config"]["calib_steps"] == header["calibration"]["observations"] > 0
    assert [r["calib_max_tokens"] for r in rows] == [64, 128] and header["baseline_tokens"] == 128
    for row in rows:
        assert row["calib_s"] > 0 and row["layers_quantized"] > 0 and len(row["per_seed"]) == 1
        assert row["pack_cache"] == ["off"]  # every value fitted its own transforms
        errors = [row["rel_err"], row["rel_err_start"], row["rel_err_worst"], row["max_abs_err"]]
        errors += row["rel_err_seed_range"]
        assert all(math.isfinite(e) and e > 0 for e in errors)  # quantization changes the actions
        assert math.isfinite(row["avg_sqnr_db"])
    assert rows[-1]["time_x"] == rows[-1]["err_x"] == 1.0


def test_bad_bit_width_stops_with_one_line(tmp_path):
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--w-bits", "9", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines() == ["error: quant.w_bits must be 2..8 or 16, got 9"]


def test_unknown_quant_field_stops_with_one_line(tmp_path):
    out = tmp_path / "calibration.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--set", "smooth=0", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[0].startswith("error: Could not override 'quant.smooth': Key 'smooth' not in")
