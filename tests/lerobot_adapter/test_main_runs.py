"""lerobot's SmolVLA, pi0.5 and pi0 through examples/libero/main.py as a user runs it: quantized LIBERO runs and
one-line refusals. The tiny pi0/pi0.5 need tiny_pi.py's sizes in the runner too: sitecustomize.py (this folder on
PYTHONPATH) applies them when TINY_PI_WIDTH is set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_pi
import tiny_smolvla
from safetensors.torch import load_file, save_file

from policies.base import file_sha256

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "examples" / "libero" / "main.py"
CHECKPOINTS = {"smolvla": "checkpoint", "pi05": "pi05_checkpoint", "pi0": "pi0_checkpoint"}
# llm+expert: every attention and MLP linear of the backbone and the action expert
LAYERS = {"smolvla": 2 * tiny_smolvla.LAYERS * 7, "pi05": 2 * tiny_pi.LAYERS * 7, "pi0": 2 * tiny_pi.LAYERS * 7}


def main(tmp_path: Path, *overrides: str, width: int = tiny_pi.WIDTH) -> subprocess.CompletedProcess:
    # One torch thread, as tests/conftest.py sets in-process: on 2 busy cores two threads made calibration 20x slower.
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", tiny_pi.WIDTH_ENV: str(width),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    args = [sys.executable, str(MAIN), f"results_dir={tmp_path}", *overrides]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_a_quantized_libero_run_with_both_cameras(kind, request, tmp_path):
    checkpoint = request.getfixturevalue(CHECKPOINTS[kind])
    # The tokenizer from the CLI key, by a path relative to where the command runs.
    tokenizer = shutil.copytree(checkpoint / "tokenizer", tmp_path / "tok")
    proc = main(tmp_path, f"policy=lerobot_{kind}", f"policy.path={checkpoint}", "policy.tokenizer=tok",
                "suite=libero_spatial", "tasks=[0]", "trials_per_task=1", "suite.max_steps=5", "num_envs=1",
                "quant=w4a8", "quant.scope=llm+expert", "quant.calib_steps=1", "quant.block_size=16")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp_path / "libero_spatial").glob(f"*_lerobot_{kind}_duquant_w4a8.json")
    doc = json.loads(path.read_text())

    assert doc["status"] == "complete" and doc["protocol"]["obs_mode"] == "rgb"
    (episode,) = doc["episodes"]
    assert episode["error"] is None and episode["steps"] == 5 and episode["policy_calls"] == 2
    assert doc["policy"]["lerobot_type"] == kind and doc["policy"]["tokenizer"] == str(tokenizer)
    assert doc["policy"]["weights_sha256"] == file_sha256(checkpoint / "model.safetensors")
    assert doc["policy"]["cameras"] == {"observation.images.image": "agentview", "observation.images.image2": "wrist"}
    assert doc["quant"]["calibration"]["complete"] and doc["quant"]["layers_quantized"] == LAYERS[kind]


def without_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def resized(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors["model.time_mlp_in.bias"] = tensors["model.time_mlp_in.bias"][:3].clone()
    save_file(tensors, path / "model.safetensors")


def without_tokenizer(path: Path) -> None:
    shutil.rmtree(path / "tokenizer")


REFUSALS = {
    "no weights": (without_weights, "lerobot_pi05", tiny_pi.WIDTH,
                   "{path} has no model.safetensors: refusing to run random weights"),
    "resized tensor": (resized, "lerobot_pi05", tiny_pi.WIDTH,
                       "{path}/model.safetensors has wrong shapes for 1 tensors: model.time_mlp_in.bias"),
    "hub tokenizer": (without_tokenizer, "lerobot_pi05", tiny_pi.WIDTH,
                      f"{{path}} names the hub model {tiny_pi.HUB_TOKENIZER!r} for its tokenizer and nothing is "
                      "downloaded here: copy that model's tokenizer and config files (no weights) into "
                      "{path}/tokenizer"),
    "wrong family": (None, "lerobot_pi0", tiny_pi.WIDTH,
                     "{path} is a lerobot 'pi05' checkpoint, not 'pi0': use policy=lerobot_pi05"),
    # lerobot builds another size than the file's, catches load_state_dict's size mismatch, prints it and returns
    # the random model. (At its real size, 4.1B parameters in float32, it would not fit beside CI's other jobs.)
    "random-weight fallback": (None, "lerobot_pi05", tiny_pi.WIDTH // 2,
                               "{path}/model.safetensors has wrong shapes for "),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_exit_2(case, pi05_checkpoint, tmp_path):
    spoil, policy, width, expected = REFUSALS[case]
    path = Path(shutil.copytree(pi05_checkpoint, tmp_path / "ckpt"))
    if spoil is not None:
        spoil(path)
    proc = main(tmp_path, f"policy={policy}", f"policy.path={path}", "quant=w4a8", width=width)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error == [proc.stderr.strip().splitlines()[-1]] and error[0].startswith("error: " + expected.format(path=path))
