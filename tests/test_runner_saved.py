"""quant.save / quant.load / quant.backend in real runs: quantize once, evaluate again without calibration."""

from __future__ import annotations

import json

import pytest

from duquant import DuQuantLinear
from libero_eval import Evaluation, quantizing
from libero_eval.errors import ConfigError
from libero_eval.quantize import QuantSetupError
from test_runner import cli, make_run
from test_runner_quant import TinyMLPPolicy

RUN = ["tasks=[0]", "trials_per_task=1", "suite.max_steps=15", "quant.calib_steps=2", "quant.block_size=32"]


def _run(tmp_path, *overrides: str, policy=None) -> dict:
    cfg, resolved = make_run([*RUN, f"results_dir={tmp_path / 'results'}", *overrides])
    policy = policy or TinyMLPPolicy()
    path = Evaluation(cfg, resolved, quantizing(policy, cfg.quant, cfg.results_dir)).run()
    return json.loads(path.read_text())


def test_a_saved_quantized_policy_runs_again_without_calibration(tmp_path):
    saved = tmp_path / "saved"
    first = _run(tmp_path, "quant=w8a8", "quant.backend=int", f"quant.save={saved}")
    record = first["quant"]["saved_to"]
    assert record["path"] == str(saved / "quantized.safetensors") and len(record["sha256"]) == 64
    assert first["quant"]["config"]["backend"] == "int"

    policy = TinyMLPPolicy()
    second = _run(tmp_path, "quant=w8a8", f"quant.load={saved}", policy=policy)
    quant = second["quant"]
    assert quant["loaded_from"] == record and quant["layers_quantized"] == 2 and quant["backend"] == "fake"
    assert quant["calibration"]["complete"] and quant["calibration"]["calls"] == [] and quant["calibration"]["calib_steps"] == 0
    assert second["status"] == "complete" and "calibration_calls" not in second["episodes"][0]
    assert isinstance(policy.net[0], DuQuantLinear) and policy.net[0].quantized


class OtherWeights(TinyMLPPolicy):
    def describe(self) -> dict:
        return {"weights_sha256": "ab" * 32}


class OtherPolicy(TinyMLPPolicy):
    name = "other_mlp"


def test_a_saved_model_from_another_policy_weights_or_config_is_refused(tmp_path):
    saved = tmp_path / "saved"
    _run(tmp_path, "quant=w4a8", f"quant.save={saved}")
    cases = [(TinyMLPPolicy, "quant=w8a8", "another quant config: quant.w_bits=4 (this run: 8)"),
             (TinyMLPPolicy, "quant=rtn_w4a8", "quant.mode='duquant' (this run: 'rtn')"),
             (OtherPolicy, "quant=w4a8", "policy 'tiny_mlp', not 'other_mlp'"),
             (OtherWeights, "quant=w4a8", "other weights")]  # fmt: skip
    for policy, quant, reason in cases:
        cfg, _ = make_run([*RUN, quant, f"quant.load={saved}"])
        with pytest.raises(QuantSetupError) as err:
            quantizing(policy(), cfg.quant, tmp_path)
        assert reason in str(err.value) and str(saved) in str(err.value)
    cfg, _ = make_run([*RUN, "quant=w4a8", f"quant.save={saved}"])
    with pytest.raises(QuantSetupError, match="already holds a saved quantized model"):
        quantizing(TinyMLPPolicy(), cfg.quant, tmp_path)
    for bad in (["quant=fp", f"quant.load={saved}"], ["quant=w4a8", f"quant.load={saved}", f"quant.save={saved}x"]):
        with pytest.raises(ConfigError):
            make_run([*RUN, *bad])


def test_cli_refuses_a_missing_saved_model_and_an_unsupported_backend_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("taken")
    for overrides, reason in (([f"quant.load={tmp_path / 'none'}"], "no saved quantized model"),
                              (["quant.act_scales=static", "quant.backend=int"], "backend=int cannot run W4A8"),
                              # refused before calibration, which a save that fails afterwards would waste
                              ([f"quant.save={tmp_path / 'a_file' / 'q'}"], "a_file is a file"),
                              (["quant.save=/proc/1/q"], "is not writable")):  # fmt: skip
        proc = cli("quant=w4a8", *overrides, f"results_dir={tmp_path / 'results'}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and reason in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()
