"""Remote policies: the openpi wire format, a real policy server on loopback, rollouts through policy=remote."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import connect
from websockets.sync.server import serve

from policies.base import file_sha256
from policies.embedded import DEFAULT_WEIGHTS, EmbeddedPolicy
from policies.remote import (
    API_KEY_ENV,
    MAX_MESSAGE_MB,
    PolicyServerError,
    RemotePolicy,
    batch_of,
    pack,
    parse_address,
    request_of,
    unpack,
)
from tests.test_embedded_policy import batch

ROOT = Path(__file__).resolve().parents[1]
SERVE, MAIN = Path(sys.executable).with_name("libero-eval-serve"), ROOT / "examples" / "libero" / "main.py"
ROLLOUT = ["tasks=[0]", "trials_per_task=1", "suite.max_steps=30", "progress=false"]


@contextmanager
def policy_server(tmp_path: Path, *overrides: str):
    """libero-eval-serve on a free loopback port; yields (address, path of its log)."""
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([str(SERVE), "port=0", f"results_dir={tmp_path}", *overrides],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        line = ""
        while " on ws://" not in line:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.poll() is None, f"server did not start:\n{log.read_text()}"
            line = proc.stdout.readline()
        yield line.split(" on ")[-1].strip(), log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollout(tmp_path: Path, address: str) -> dict:
    overrides = ["policy=remote", f"policy.path={address}", f"results_dir={tmp_path}", *ROLLOUT]
    result = subprocess.run(
        [sys.executable, str(MAIN), *overrides], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(Path(result.stdout.strip().splitlines()[-1].removeprefix("results: ")).read_text())


# -- the wire format ------------------------------------------------------------------------------------------------


def test_codec_uses_openpi_array_layout():
    arrays = {"u8": np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "f32": np.linspace(0, 1, 7, dtype=np.float32),
              "i64": np.array([[-1, 2]], dtype=np.int64), "scalar": np.float32(0.5)}  # fmt: skip
    decoded = unpack(pack(arrays))
    for key, value in arrays.items():
        assert decoded[key].dtype == value.dtype and np.array_equal(decoded[key], value)
    raw = msgpack.unpackb(pack({"a": arrays["f32"]}))["a"]
    assert raw == {b"__ndarray__": True, b"data": arrays["f32"].tobytes(), b"dtype": "<f4", b"shape": [7]}
    # A reply framed by hand the way openpi's msgpack_numpy frames one.
    actions = np.ones((5, 7), dtype=np.float32)
    foreign = msgpack.packb(
        {"actions": {b"__ndarray__": True, b"data": actions.tobytes(), b"dtype": "<f4", b"shape": (5, 7)}}
    )
    assert np.array_equal(unpack(foreign)["actions"], actions)
    with pytest.raises(TypeError, match="dtype object"):
        pack(np.array([None]))


def test_requests_carry_libero_keys_and_round_trip():
    rows = batch([3, 4], [0, 5])
    rows.images = {"agentview": np.zeros((2, 8, 8, 3), np.uint8), "wrist": np.ones((2, 8, 8, 3), np.uint8)}
    rows.object_names = [["bowl", "plate"], ["ketchup", "basket"]]
    request = unpack(pack(request_of(rows, 1, reset=True)))
    assert {"observation/image", "observation/wrist_image", "observation/state", "prompt", "observation/object_poses",
            "observation/object_names", "harness/episode_id", "harness/reset"} <= set(request)  # fmt: skip
    back = batch_of(request, episode_id="unused", step=-1)
    assert back.episode_ids == ["ep1"] and back.episode_seeds == [4] and back.steps == [5]
    assert back.object_names == [["ketchup", "basket"]]
    assert np.array_equal(back.state[0], rows.state[1]) and np.array_equal(
        back.images["wrist"][0], rows.images["wrist"][1]
    )
    assert np.array_equal(back.object_poses[0], rows.object_poses[1]) and back.instructions == [rows.instructions[1]]


def test_only_ws_host_port_addresses_are_accepted():
    assert parse_address("ws://127.0.0.1:8000") == ("127.0.0.1", 8000)
    for bad in ("127.0.0.1:8000", "http://h:1", "ws://h", "ws://h:1/path", "ws://h:99999"):
        with pytest.raises(PolicyServerError, match="ws://HOST:PORT"):
            parse_address(bad)


# -- a real server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory):
    with policy_server(tmp_path_factory.mktemp("serve_fp"), "policy=embedded") as (address, _):
        yield address


def test_remote_predictions_match_the_in_process_policy(embedded_server):
    remote, local = RemotePolicy(embedded_server), EmbeddedPolicy()
    rows = batch([0, 1, 2], [0, 5, 10])
    np.testing.assert_allclose(remote.predict(rows), local.predict(rows), atol=1e-5)
    assert remote.obs_mode is local.obs_mode and remote.chunk_size == local.chunk_size == 10
    described = remote.describe()
    assert described["server"] == embedded_server
    assert described["server_metadata"]["weights_sha256"] == local.describe()["weights_sha256"]
    assert described["server_metadata"]["quant"] == {"mode": "fp"}


def test_policy_sha256_is_checked_against_the_served_weights(embedded_server):
    served, wrong = file_sha256(DEFAULT_WEIGHTS), "0" * 64
    assert RemotePolicy.from_config(embedded_server, sha256=served).describe()["weights_sha256"] == served
    with pytest.raises(ValueError) as caught:
        RemotePolicy.from_config(embedded_server, sha256=wrong)
    assert "\n" not in str(caught.value)
    assert all(part in str(caught.value) for part in (str(DEFAULT_WEIGHTS), embedded_server, served, wrong))


def test_server_traceback_becomes_one_line_and_the_next_call_reconnects(embedded_server):
    remote = RemotePolicy(embedded_server)
    no_poses = batch([0], [0])
    no_poses.object_poses = None
    with pytest.raises(PolicyServerError) as caught:
        remote.predict(no_poses)
    assert "\n" not in str(caught.value)
    assert str(caught.value).endswith(
        "failed: ValueError: the embedded policy reads object poses: build the env in 'state' observation mode"
    )
    assert remote.predict(batch([0], [0])).shape == (1, 10, 7)


def test_a_client_without_harness_keys_is_served(embedded_server):
    rows = batch([0], [0])
    request = {"observation/state": rows.state[0], "prompt": rows.instructions[0],
               "observation/object_poses": rows.object_poses[0], "observation/object_names": ["a", "b"]}  # fmt: skip
    with connect(embedded_server, compression=None, max_size=None) as ws:  # as openpi_client connects
        assert unpack(ws.recv(timeout=30))["policy"] == "embedded"
        ws.send(pack(request))
        reply = unpack(ws.recv(timeout=60))
    assert reply["actions"].shape == (10, 7) and reply["server_timing"]["infer_ms"] > 0


def test_rollout_through_policy_remote(embedded_server, tmp_path):
    doc = rollout(tmp_path, embedded_server)
    (episode,) = doc["episodes"]
    assert episode["error"] is None and episode["steps"] == 30 and episode["policy_calls"] == 6
    assert doc["policy"]["name"] == "remote" and doc["policy"]["server_metadata"]["policy"] == "embedded"
    assert doc["protocol"]["obs_mode"] == "state" and doc["protocol"]["chunk_size"] == 10


def test_quantized_server_calibrates_on_the_first_real_requests_and_a_saved_one_serves_without(tmp_path):
    quant = ["quant=w4a8", "quant.calib_steps=2", "quant.scope=expert_mlp", "quant.rotation_steps=16"]
    saved = tmp_path / "saved"
    with policy_server(tmp_path, "policy=embedded", *quant, f"quant.save={saved}") as (address, log):
        remote = RemotePolicy(address)
        chunks = [remote.predict(batch([0], [step])) for step in (0, 5, 10)]  # 2 calibrate (FP), then quantized
        after = RemotePolicy(address).describe()["server_metadata"]["quant"]
    before = remote.describe()["server_metadata"]["quant"]
    assert before["calibrated"] is False and before["config"]["w_bits"] == 4 and before["config"]["calib_steps"] == 2
    assert after["calibrated"] is True and after["layers_quantized"] == 9  # 3 expert layers x gate/up/down
    assert "calibrated on 2 requests: 9 layers quantized" in log.read_text()
    assert all(np.isfinite(c).all() for c in chunks) and any((tmp_path / "duquant_packs").iterdir())
    assert after["saved_to"]["path"] == str(saved / "quantized.safetensors")

    (tmp_path / "again").mkdir()
    with policy_server(tmp_path / "again", "policy=embedded", *quant, f"quant.load={saved}", "quant.backend=int") as (
        address, _):  # fmt: skip
        loaded = RemotePolicy(address)
        quantized = loaded.predict(batch([0], [10]))  # no calibration: quantized from the first request
        served = loaded.describe()["server_metadata"]["quant"]
    assert served["calibrated"] and served["loaded_from"] == after["saved_to"] and served["config"]["backend"] == "int"
    assert np.abs(quantized - chunks[2]).max() < 5e-3  # int against fake, as tests/test_duquant_int.py


def test_no_server_is_a_bounded_one_line_failure():
    address = f"ws://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(PolicyServerError, match=f"no policy server at {address} after 2 attempts"):
        RemotePolicy(address, connect_attempts=2, retry_wait_s=0.2)
    assert time.monotonic() - start < 5
    result = subprocess.run([sys.executable, str(MAIN), "policy=remote", f"policy.path={address}"],
                            check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith(f"error: no policy server at {address} after 3 attempts")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("port=70000", "error: port must be in 0..65535, got 70000"),
        ("quant=w5a8", "error: In 'serve': Could not find 'quant/w5a8'; available: fp,"),  # Hydra's, in one line
        ("seed=1", "error: Could not override 'seed': Key 'seed' not in 'ServeConfig'"),
    ],
)
def test_server_refuses_a_bad_config_in_one_line(override, message):
    proc = subprocess.run([str(SERVE), override], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message)


# -- limits and the shared key ---------------------------------------------------------------------------------------

KEY = "test-key-0123"
AUTH = {"Authorization": f"Api-Key {KEY}"}  # the header openpi-client sends for api_key=KEY


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A server with a key that closes connections idle for 2 s and refuses frames over 1 MiB: (address, log)."""
    overrides = ("policy=embedded", f"api_key={KEY}", "idle_timeout_s=2", "max_message_mb=1")
    with policy_server(tmp_path_factory.mktemp("serve_guarded"), *overrides) as served:
        yield served


def test_a_server_with_a_key_refuses_a_handshake_without_it(guarded_server, monkeypatch):
    address, _ = guarded_server
    for headers in (None, {"Authorization": "Api-Key wrong"}, {"Authorization": KEY}):
        with pytest.raises(InvalidStatus) as caught:
            connect(address, additional_headers=headers, open_timeout=10)
        assert caught.value.response.status_code == 401
    with connect(address, additional_headers=AUTH, compression=None, max_size=None) as ws:  # as openpi-client does
        assert unpack(ws.recv(timeout=30))["policy"] == "embedded"
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(PolicyServerError, match=rf"refused the api key \(HTTP 401\): set {API_KEY_ENV}"):
        RemotePolicy(address)
    assert time.monotonic() - start < 2  # not retried: a wrong key stays wrong
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert RemotePolicy(address).predict(batch([0], [0])).shape == (1, 10, 7)


def test_binding_beyond_loopback_without_a_key_is_refused_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    proc = subprocess.run([sys.executable, str(SERVE), "host=0.0.0.0", "port=0"], check=False, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: host=0.0.0.0 is reachable from other machines: set a shared key in {API_KEY_ENV}"
    )


def test_an_idle_connection_is_closed_and_the_client_reconnects(guarded_server, monkeypatch):
    address, _ = guarded_server
    with connect(address, additional_headers=AUTH) as ws:
        ws.recv(timeout=10)  # the metadata, then nothing is sent
        start = time.monotonic()
        with pytest.raises(ConnectionClosed) as caught:
            ws.recv(timeout=30)
    assert 1.5 < time.monotonic() - start < 20 and caught.value.rcvd.code == CloseCode.GOING_AWAY
    monkeypatch.setenv(API_KEY_ENV, KEY)
    remote = RemotePolicy(address)
    remote.predict(batch([0], [0]))
    time.sleep(3)  # the server closes the connection meanwhile
    assert remote.predict(batch([0], [5])).shape == (1, 10, 7)


def test_an_oversize_frame_is_refused_by_the_server(guarded_server):
    address, _ = guarded_server
    with connect(address, additional_headers=AUTH, max_size=None) as ws:
        ws.recv(timeout=10)
        with pytest.raises(ConnectionClosed) as caught:
            ws.send(b"\0" * (2 << 20))  # over the server's max_message_mb=1
            ws.recv(timeout=30)
    assert caught.value.rcvd.code == CloseCode.MESSAGE_TOO_BIG


def test_an_oversize_frame_is_refused_by_the_client():
    def flood(ws) -> None:  # a server whose metadata is larger than any legitimate frame
        ws.send(b"\0" * ((MAX_MESSAGE_MB + 1) << 20))

    with serve(flood, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        with pytest.raises(PolicyServerError, match="after 1 attempts .*1009 \\(message too big\\)"):
            RemotePolicy(address, connect_attempts=1)
        server.shutdown()


def test_an_error_frame_is_one_line_and_the_traceback_stays_in_the_log(guarded_server):
    address, log = guarded_server
    no_poses = batch([0], [0])
    no_poses.object_poses = None
    with connect(address, additional_headers=AUTH) as ws:
        ws.recv(timeout=10)
        ws.send(pack(request_of(no_poses, 0, reset=True)))
        error = ws.recv(timeout=30)
    assert error == "ValueError: the embedded policy reads object poses: build the env in 'state' observation mode"
    assert "Traceback" in log.read_text() and 'File "' in log.read_text()
