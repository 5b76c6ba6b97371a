"""``libero-eval-serve``: serve any harness policy, optionally DuQuant-quantized, over openpi's websocket protocol.

    libero-eval-serve policy=embedded quant=w4a8 host=0.0.0.0 port=8000   # on the GPU box
    libero-eval policy=remote policy.path=ws://GPU_BOX:8000                # on each CPU box

``policy=`` and ``quant=`` are main.py's config groups. A quantized policy
calibrates on the first ``quant.calib_steps`` requests it serves (real
observations, no warm-up), as in a local run. Requests from several clients are
served one at a time. The wire format is documented in ``policies/remote.py``;
openpi's own clients (e.g. its LIBERO example) work unchanged.

Exposure is bounded: frames over ``max_message_mb`` and connections silent for
``idle_timeout_s`` are closed, a failed request tells the client one line (the
traceback goes to this server's log), and a server that is not bound to
loopback needs a shared key (``LIBERO_EVAL_API_KEY`` or ``api_key=``) that every
handshake must carry as ``Authorization: Api-Key <key>``, or gets HTTP 401.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Optional

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from libero_eval.configure import check_save_folder, compose, register_schema
from libero_eval.config import PolicyConfig, QuantRunConfig
from libero_eval.errors import ConfigError, fail, one_line
from libero_eval.quantize import CalibratingPolicy, dry_run_report, quantizing
from policies import Policy, make_policy
from policies.base import recorded_weights_sha256
from policies.remote import API_KEY_ENV, MAX_MESSAGE_MB, RESET_KEY, batch_of, pack, unpack

log = logging.getLogger("libero_eval.serve")


@dataclass
class ServeConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quant: QuantRunConfig = field(default_factory=QuantRunConfig)
    host: str = "127.0.0.1"  # 0.0.0.0 serves every interface (and then needs a key)
    port: int = 8000  # 0 = any free port (the line printed on start says which)
    results_dir: str = "results"  # DuQuant transform packs are cached in <results_dir>/duquant_packs
    max_message_mb: int = MAX_MESSAGE_MB  # larger frames end the connection (the sizing is in policies/remote.py)
    idle_timeout_s: float = 300.0  # a connection that sends no request this long is closed
    # Clients must send "Authorization: Api-Key <key>" (as openpi-client does); required unless bound to loopback.
    # None = the LIBERO_EVAL_API_KEY environment variable, which, unlike this key, stays out of `ps`.
    api_key: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_message_mb < 1 or self.idle_timeout_s <= 0:
            raise ConfigError("max_message_mb must be >= 1 and idle_timeout_s > 0")
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None
        if self.api_key is None and not self.loopback:
            raise ConfigError(
                f"host={self.host} is reachable from other machines: set a shared key in {API_KEY_ENV} "
                "(or api_key=...), which clients send, or serve on host=127.0.0.1"
            )

    @property
    def loopback(self) -> bool:
        """Only this machine can connect; a host name other than localhost may resolve to a public interface."""
        try:
            return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class PolicyServer:
    """One policy behind a websocket endpoint; inference runs in a worker thread so pings keep flowing."""

    def __init__(self, policy: Policy, cfg: ServeConfig):
        self.cfg = cfg
        self.policy = policy
        self.served = quantizing(policy, cfg.quant, cfg.results_dir)
        self.calibrator = self.served if isinstance(self.served, CalibratingPolicy) else None
        self._lock = threading.Lock()
        self._connection_ids = itertools.count()
        checkpoint, described = policy.checkpoint, policy.describe()
        # Hashing the weights and describing the policy once, not on every connection: neither changes.
        self._policy_record = {"policy": policy.name, "obs_mode": policy.obs_mode.value,
                               "chunk_size": policy.chunk_size, "checkpoint": checkpoint,
                               "weights_sha256": recorded_weights_sha256(checkpoint, described),
                               "describe": described}  # fmt: skip

    def metadata(self) -> dict:
        """What a client records about the policy it talks to (sent on every new connection)."""
        quant: dict = {"mode": self.cfg.quant.mode}
        if self.calibrator is not None:
            report = self.calibrator.report or {}
            quant.update(config=asdict(self.cfg.quant), calibrated=self.calibrator.calibrated,
                         layers_quantized=report.get("layers_quantized"), average_sqnr_db=report.get("average_sqnr_db"),
                         loaded_from=report.get("loaded_from"), saved_to=report.get("saved_to"))  # fmt: skip
        return {**self._policy_record, "quant": quant}

    def infer(self, request: dict, connection: str, requests: int) -> np.ndarray:
        # A client that sends no harness keys (e.g. openpi's LIBERO example) gets one episode per connection.
        batch = batch_of(request, episode_id=connection, step=requests)
        with self._lock:
            if request.get(RESET_KEY):
                self.served.reset()
            was_calibrated = self.calibrator is not None and self.calibrator.calibrated
            chunks = self.served.predict(batch)
            if self.calibrator is not None and self.calibrator.calibrated and not was_calibrated:
                report = self.calibrator.report
                log.info("calibrated on %d requests: %s layers quantized, average SQNR %s dB",
                         self.calibrator.calls_seen, report["layers_quantized"], report["average_sqnr_db"])  # fmt: skip
        return np.asarray(chunks[0], dtype=np.float32)

    def authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        """The handshake's check of the shared key; None lets the connection through, a 401 refuses it."""
        if self.cfg.api_key is None:
            return None
        expected = f"Api-Key {self.cfg.api_key}".encode()
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return None
        log.warning("refused %s: missing or wrong api key", connection.remote_address)
        return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong api key\n")

    async def handle(self, websocket: ServerConnection) -> None:
        connection = f"connection{next(self._connection_ids)}"
        await websocket.send(pack(self.metadata()))
        for requests in itertools.count():
            try:
                frame = await asyncio.wait_for(websocket.recv(), self.cfg.idle_timeout_s)
            except TimeoutError:  # a silent client would hold its socket forever
                log.info("closing %s: no request in %g s", connection, self.cfg.idle_timeout_s)
                await websocket.close(CloseCode.GOING_AWAY, f"idle for {self.cfg.idle_timeout_s:g} s")
                return
            except ConnectionClosed:
                return
            try:
                if not isinstance(frame, bytes):
                    raise TypeError("requests must be binary msgpack frames")
                start = time.monotonic()
                actions = await asyncio.to_thread(self.infer, unpack(frame), connection, requests)
                await websocket.send(
                    pack({"actions": actions, "server_timing": {"infer_ms": (time.monotonic() - start) * 1e3}})
                )
            except ConnectionClosed:
                return
            except Exception as exc:  # a text frame, then close, as from an openpi server
                log.exception("request %d on %s failed", requests, connection)  # the traceback stays here
                await websocket.send(self.error_line(exc))
                await websocket.close(CloseCode.INTERNAL_ERROR, "Internal server error. Error in previous frame.")
                return

    @staticmethod
    def error_line(exc: Exception) -> str:
        """``ExceptionType: first line of the message``: what a client learns of a failure; a traceback would show
        it the server's source paths and code."""
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__

    async def serve_until_signalled(self) -> None:
        stop = asyncio.get_running_loop().create_future()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
        async with serve(self.handle, self.cfg.host, self.cfg.port, compression=None,
                         max_size=self.cfg.max_message_mb << 20, process_request=self.authorize) as server:  # fmt: skip
            port = server.sockets[0].getsockname()[1]
            print(f"serving {self.policy.name} ({self.cfg.quant.tag()}) on ws://{self.cfg.host}:{port}", flush=True)
            await stop


def load_config(overrides: list[str]) -> ServeConfig:
    register_schema("serve_schema", ServeConfig)
    return OmegaConf.to_object(compose(overrides, config_name="serve"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        check_save_folder(cfg.quant.save)
        policy = make_policy(**asdict(cfg.policy))
        if cfg.quant.dry_run:
            print(dry_run_report(policy, cfg.quant))
            return
        server = PolicyServer(policy, cfg)
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as exc:
        fail(one_line(exc))
    try:
        asyncio.run(server.serve_until_signalled())
    except OSError as exc:  # the address is taken or not this machine's
        fail(f"cannot serve on {cfg.host}:{cfg.port}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
