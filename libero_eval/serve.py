"""``libero-eval-serve``: serve any harness policy, optionally DuQuant-quantized, over openpi's websocket protocol.

    libero-eval-serve policy=embedded quant=w4a8 host=0.0.0.0 port=8000   # on the GPU box
    libero-eval policy=remote policy.path=ws://GPU_BOX:8000                # on each CPU box

``policy=`` and ``quant=`` are main.py's config groups. A quantized policy
calibrates on the first ``quant.calib_steps`` requests it serves (real
observations, no warm-up), as in a local run. Requests from several clients are
served one at a time. The wire format is documented in ``policies/remote.py``;
openpi's own clients (e.g. its LIBERO example) work unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from libero_eval.configure import compose, register_schema
from libero_eval.config import PolicyConfig, QuantRunConfig
from libero_eval.errors import ConfigError, fail, one_line
from libero_eval.quantize import CalibratingPolicy, dry_run_report, quantizing
from policies import Policy, make_policy
from policies.base import recorded_weights_sha256
from policies.remote import RESET_KEY, batch_of, pack, unpack

log = logging.getLogger("libero_eval.serve")


@dataclass
class ServeConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quant: QuantRunConfig = field(default_factory=QuantRunConfig)
    host: str = "127.0.0.1"  # 0.0.0.0 serves every interface
    port: int = 8000  # 0 = any free port (the line printed on start says which)
    results_dir: str = "results"  # DuQuant transform packs are cached in <results_dir>/duquant_packs

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")


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
                         layers_quantized=report.get("layers_quantized"), average_sqnr_db=report.get("average_sqnr_db"))  # fmt: skip
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

    async def handle(self, websocket: ServerConnection) -> None:
        connection = f"connection{next(self._connection_ids)}"
        await websocket.send(pack(self.metadata()))
        for requests in itertools.count():
            try:
                frame = await websocket.recv()
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
            except Exception:  # the client gets the traceback, as from an openpi server
                log.exception("request %d on %s failed", requests, connection)
                await websocket.send(traceback.format_exc())
                await websocket.close(
                    CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame."
                )
                return

    async def serve_until_signalled(self) -> None:
        stop = asyncio.get_running_loop().create_future()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
        async with serve(self.handle, self.cfg.host, self.cfg.port, compression=None, max_size=None) as server:
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
