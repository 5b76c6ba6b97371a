"""Quantized runs: calibration on the first real policy calls, recorded, and optionally rescored."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from libero_eval import Evaluation, quantizing
from policies.base import ObservationBatch, ObsMode, Policy
from test_runner import MAIN, ROOT, make_run


class TinyMLPPolicy(Policy):
    """A small real torch policy (random weights) whose linears duquant can select."""

    name, obs_mode, chunk_size = "tiny_mlp", ObsMode.STATE, 5

    def __init__(self):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8 + 14, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 35))
        self.calls = 0

    @property
    def module(self) -> nn.Module:
        return self.net

    def scope_presets(self) -> dict:
        return {"default": {"include": [r"^[01234]$"], "exclude": [r"^4$"]}}  # the output head stays FP

    @torch.no_grad()
    def predict(self, batch: ObservationBatch) -> np.ndarray:
        self.calls += 1
        x = torch.as_tensor(np.concatenate([batch.state, batch.object_poses.reshape(len(batch), -1)], 1))
        return torch.tanh(self.net(x)).reshape(len(batch), 5, 7).numpy() * 0.1


# With two workers, calibration still runs one episode at a time: the same calls as with one.
@pytest.mark.parametrize(("rescore", "num_envs"), [(False, 1), (True, 1), (False, 2)])
def test_calibration_uses_the_first_real_calls_and_is_recorded(tmp_path, rescore, num_envs):
    cfg, resolved = make_run(["quant=w4a8", "quant.calib_steps=4", "quant.block_size=32", "tasks=[0]",
                              "trials_per_task=2", "suite.max_steps=15", f"calibration.rescore={rescore}",
                              f"num_envs={num_envs}", f"results_dir={tmp_path}"])  # fmt: skip
    policy = TinyMLPPolicy()
    path = Evaluation(cfg, resolved, quantizing(policy, cfg.quant, cfg.results_dir)).run()
    doc = json.loads(path.read_text())
    calibration = doc["quant"]["calibration"]

    assert path.name.endswith("_tiny_mlp_duquant_w4a8.json")
    assert calibration["complete"] and calibration["episodes"] == ["libero_spatial/task0/ep0", "libero_spatial/task0/ep1"]
    assert [c["step"] for c in calibration["calls"]] == [0, 5, 10, 0]  # 3 calls per episode, first real ones
    assert doc["quant"]["layers_quantized"] == 2 and doc["quant"]["bits"] == "W4A8"
    assert type(policy.net[2]).__name__ == "DuQuantLinear" and isinstance(policy.net[4], nn.Linear)
    episodes = {e["episode"]: e for e in doc["episodes"]}
    if rescore:
        assert all(e.get("rescored") and e["calibration_calls"] == 0 for e in episodes.values())
        assert policy.calls == 4 + 3 + 3 + 2  # calibration, then both episodes again fully quantized
        assert len(path.with_suffix(".jsonl").read_text().splitlines()) == 4
    else:
        assert episodes[0]["calibration_calls"] == 3 and episodes[1]["calibration_calls"] == 1
        assert policy.calls == 6


def test_a_scope_matching_nothing_is_an_error(tmp_path):
    cfg, resolved = make_run(["quant=w4a8", "quant.exclude=[.]", f"results_dir={tmp_path}"])
    with pytest.raises(ValueError, match="no layers matched"):
        quantizing(TinyMLPPolicy(), cfg.quant, cfg.results_dir)
    assert not any(tmp_path.iterdir())


def quantized_run_killed_after_calibration(tmp_path) -> tuple[list[str], Path, dict]:
    """A real quantized run of the embedded policy, killed with SIGKILL once an episode after calibration is
    recorded: (its command, its results JSON, the JSON as the kill left it)."""
    args = [sys.executable, str(MAIN), "quant=w4a8", "quant.calib_steps=3", "quant.block_size=32", "tasks=[0]",
            "trials_per_task=4", "suite.max_steps=30", "num_envs=1", "progress=false", f"results_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder, deadline = tmp_path / "libero_spatial", time.time() + 240
    jsonl: list[Path] = []
    while time.time() < deadline and not (jsonl and len(jsonl[0].read_text().splitlines()) >= 2):
        time.sleep(0.2)
        jsonl = list(folder.glob("*.jsonl")) if folder.exists() else []
    proc.kill()
    proc.communicate(timeout=60)
    path = jsonl[0].with_suffix(".json")
    return args, path, json.loads(path.read_text())


def test_a_quantized_run_killed_hard_resumes_on_the_same_calibration(tmp_path):
    args, path, killed = quantized_run_killed_after_calibration(tmp_path)
    assert killed["status"] == "running" and killed["quant"]["calibration"]["complete"]
    assert killed["quant"]["calibration"]["episodes"] == ["libero_spatial/task0/ep0"]

    # A copy as a run of an older version left it when killed: quantized episodes, no calibration record.
    older = path.with_name("older.json")
    older.write_text(json.dumps({**killed, "quant": {"mode": "duquant"}}))
    older.with_suffix(".jsonl").write_bytes(path.with_suffix(".jsonl").read_bytes())
    refused = subprocess.run([*args[:2], f"resume={older}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert refused.returncode == 2 and "no record of the calibration" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    resumed = subprocess.run([*args[:2], f"resume={path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(path.read_text())
    assert doc["status"] == "complete" and sorted(e["episode"] for e in doc["episodes"]) == [0, 1, 2, 3]
    assert doc["quant"]["calibration"]["calls"] == killed["quant"]["calibration"]["calls"]
    assert [(r["name"], r["sqnr_db"]) for r in doc["quant"]["layers"]] == [
        (r["name"], r["sqnr_db"]) for r in killed["quant"]["layers"]
    ]
    assert doc["quant"]["cache_misses"] == 0  # every transform came back from the pack the killed run fitted
