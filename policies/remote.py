"""A policy that runs elsewhere, reached over openpi's websocket protocol.

The protocol is openpi's (``openpi_client.WebsocketClientPolicy``): on connect the
server sends its metadata, then each binary request frame holds one observation
and each binary reply frame holds ``{"actions": [chunk, 7], ...}``; a text frame
instead of a reply is the server's traceback. Frames are msgpack with NumPy
arrays as ``{b"__ndarray__": True, b"data", b"dtype", b"shape"}`` maps.
``openpi-client`` itself pins ``numpy<2``, so the codec lives here (msgpack +
websockets); the format is the same, byte for byte.

A request carries the keys of openpi's LIBERO example where they apply, plus
what this harness's state-mode policies and per-episode noise need::

    observation/image         uint8 [H, W, 3]   agentview, rotated 180 degrees, padded-resized (rgb mode)
    observation/wrist_image   uint8 [H, W, 3]   wrist camera, same processing (rgb mode)
    observation/state         float32 [8]       eef position, eef axis-angle, gripper qpos
    prompt                    str               the task instruction
    observation/object_poses  float32 [K, 7]    objects of interest, xyz + quaternion xyzw (state mode)
    observation/object_names  list[str]         their names, in the task's bddl order (state mode)
    harness/episode_id        str               unique per episode
    harness/episode_seed      int               seeds the policy's noise for that episode
    harness/step              int               env step (after the wait) this observation was taken at
    harness/reset             bool              true on the first request after the client's reset(): the
                                                server calls its policy's reset() first (a stateful policy
                                                served to several clients is reset by each one's)

openpi servers read only the keys they know, so the extra keys are harmless to them.

A server that holds a shared key (always, when it is not bound to loopback) wants
it in the handshake as openpi-client sends its ``api_key``: the header
``Authorization: Api-Key <key>``. This client takes the key from the
``LIBERO_EVAL_API_KEY`` environment variable only, never from the config: the
config is written into every results file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from contextlib import ExitStack
from http import HTTPStatus
from urllib.parse import urlsplit

import msgpack
import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from policies.base import ACTION_DIM, ObservationBatch, ObsMode, Policy
from policies.checkpoints import check_sha256, expected_sha256

log = logging.getLogger(__name__)

IMAGE_KEYS = {"agentview": "observation/image", "wrist": "observation/wrist_image"}
STATE_KEY, PROMPT_KEY = "observation/state", "prompt"
POSES_KEY, NAMES_KEY = "observation/object_poses", "observation/object_names"
EPISODE_KEY, SEED_KEY, STEP_KEY, RESET_KEY = (
    "harness/episode_id",
    "harness/episode_seed",
    "harness/step",
    "harness/reset",
)

API_KEY_ENV = "LIBERO_EVAL_API_KEY"  # the shared key, for the server and for its clients
# Both ends refuse larger frames. The largest legitimate frame is a request, one observation: two uint8 camera
# images (224x224x3 as the harness sends them; 256x256x3 = 192 KiB each from a client that sends them as
# rendered), 8 floats, a prompt and a few object poses: under 0.4 MiB. Replies (an action chunk, the metadata)
# are a few KiB. 16 MiB is 40 times that: room for 1024 px cameras (6 MiB) or a foreign client that batches tens
# of observations, while a client can no longer make the server buffer arbitrary amounts.
MAX_MESSAGE_MB = 16


class PolicyServerError(ValueError):
    """The policy server cannot be reached or failed a request; the message is one line."""


# -- msgpack with NumPy arrays, in openpi's layout ----------------------------------------------------------------


def _encode_numpy(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise TypeError(f"cannot send a NumPy value of dtype {obj.dtype} (object, void and complex have no wire form)")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def _decode_numpy(obj: dict):
    if b"__ndarray__" in obj:
        # A copy: frombuffer views the frame's immutable bytes, and policies may write into their inputs' tensors.
        return np.frombuffer(obj[b"data"], dtype=np.dtype(obj[b"dtype"])).reshape(obj[b"shape"]).copy()
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def pack(obj) -> bytes:
    return msgpack.packb(obj, default=_encode_numpy)


def unpack(frame: bytes):
    return msgpack.unpackb(frame, object_hook=_decode_numpy)


# -- observations on the wire --------------------------------------------------------------------------------------


def request_of(batch: ObservationBatch, row: int, *, reset: bool) -> dict:
    """The wire request for one row of a batch."""
    request = {
        STATE_KEY: np.asarray(batch.state[row], dtype=np.float32),
        PROMPT_KEY: batch.instructions[row],
        EPISODE_KEY: batch.episode_ids[row],
        SEED_KEY: int(batch.episode_seeds[row]),
        STEP_KEY: int(batch.steps[row]),
        RESET_KEY: reset,
    }
    request.update({key: batch.images[name][row] for name, key in IMAGE_KEYS.items() if name in batch.images})
    if batch.object_poses is not None:
        request[POSES_KEY] = np.asarray(batch.object_poses[row], dtype=np.float32)
    if batch.object_names is not None:
        request[NAMES_KEY] = list(batch.object_names[row])
    return request


def batch_of(request: dict, *, episode_id: str, step: int) -> ObservationBatch:
    """A one-row batch from a wire request; ``episode_id`` and ``step`` stand in when a client sends no harness keys."""
    if STATE_KEY not in request:
        raise KeyError(f"request has no {STATE_KEY!r}; keys: {', '.join(sorted(map(str, request)))}")
    poses = request.get(POSES_KEY)
    names = request.get(NAMES_KEY)
    return ObservationBatch(
        state=np.asarray(request[STATE_KEY], dtype=np.float32)[None],
        instructions=[str(request.get(PROMPT_KEY, ""))],
        episode_ids=[str(request.get(EPISODE_KEY, episode_id))],
        episode_seeds=[int(request.get(SEED_KEY, 0))],
        steps=[int(request.get(STEP_KEY, step))],
        images={name: np.asarray(request[key])[None] for name, key in IMAGE_KEYS.items() if key in request},
        object_poses=None if poses is None else np.asarray(poses, dtype=np.float32)[None],
        object_names=None if names is None else [list(names)],
    )


def json_safe(value):
    """Metadata as plain JSON values (a foreign server may send arrays or bytes)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v)))


# -- the client ----------------------------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a ``ws://HOST:PORT`` address; anything else is refused with one line."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "ws" or not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise PolicyServerError(f"policy.path must be a policy server address ws://HOST:PORT, got {address!r}")
    return parts.hostname, port


class RemotePolicy(Policy):
    """Asks a policy server for each action chunk, one observation per request.

    Connecting tries ``connect_attempts`` times, ``retry_wait_s`` apart, each
    bounded by ``connect_timeout_s``; a request waits at most
    ``request_timeout_s`` (generous: a quantized server calibrates inside a
    request). The socket is opened here and handed to websockets, so a redirect
    can never lead elsewhere and no proxy is used. A failed request drops the
    connection, as does a server that closed it (idle); the next call reconnects.
    A frame over ``max_message_mb`` ends the connection. With ``sha256``, every
    connection checks that the server serves those weights.
    """

    name = "remote"

    def __init__(
        self,
        address: str,
        *,
        connect_timeout_s: float = 10.0,
        connect_attempts: int = 3,
        retry_wait_s: float = 2.0,
        request_timeout_s: float = 600.0,
        max_message_mb: int = MAX_MESSAGE_MB,
        sha256: str | None = None,
    ):
        self.address = address
        self._max_message_bytes = max_message_mb << 20
        self._sha256 = sha256
        self._host, self._port = parse_address(address)
        self._connect_timeout_s, self._connect_attempts = connect_timeout_s, connect_attempts
        self._retry_wait_s, self._request_timeout_s = retry_wait_s, request_timeout_s
        self._conn: ClientConnection | None = None
        self._open = ExitStack()  # closes the connection
        self.metadata: dict = {}
        self._connect()
        self.obs_mode = ObsMode(self.metadata.get("obs_mode", ObsMode.RGB.value))  # openpi VLAs read cameras
        self.chunk_size = self.metadata.get("chunk_size")  # None until a reply shows it, if the server does not say
        self._reset_pending = True

    @classmethod
    def from_config(cls, path: str | None = None, device: str = "auto", sha256: str | None = None) -> RemotePolicy:
        if path is None:
            raise PolicyServerError("policy=remote needs the server's address: policy.path=ws://HOST:PORT")
        return cls(path, sha256=expected_sha256(sha256))

    def _check_weights(self) -> None:
        """Refuse a server whose ``weights_sha256`` is not ``sha256``: checked on every connection, since a
        server restarted between two of them may serve other weights."""
        served = self.metadata.get("weights_sha256")
        try:
            if served is None:
                raise PolicyServerError(
                    f"policy server {self.address} sends no weights_sha256 to check policy.sha256 against"
                )
            check_sha256(f"{self.metadata.get('checkpoint')} served at {self.address}", served, self._sha256)
        except ValueError:
            self.close()
            raise

    def _connect(self) -> None:
        error: Exception | None = None
        for attempt in range(self._connect_attempts):
            if attempt:
                time.sleep(self._retry_wait_s)
            try:
                with ExitStack() as opened:
                    sock = socket.create_connection((self._host, self._port), timeout=self._connect_timeout_s)
                    conn = opened.enter_context(connect(self.address, sock=sock, compression=None,
                                                        max_size=self._max_message_bytes, ping_interval=None,
                                                        open_timeout=self._connect_timeout_s,
                                                        additional_headers=self._auth_headers()))  # fmt: skip
                    metadata = unpack(conn.recv(timeout=self._connect_timeout_s))
                    self._open = opened.pop_all()  # keep the connection open past this block
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                if isinstance(exc, InvalidStatus) and exc.response.status_code == HTTPStatus.UNAUTHORIZED:
                    raise PolicyServerError(  # retrying cannot help
                        f"policy server {self.address} refused the api key (HTTP 401): set {API_KEY_ENV} to its key"
                    ) from None
                error = exc
                log.info("policy server %s: attempt %d failed (%s)", self.address, attempt + 1, exc)
                continue
            self._conn, self.metadata = conn, json_safe(metadata) if isinstance(metadata, dict) else {}
            if self._sha256 is not None:
                self._check_weights()
            return
        raise PolicyServerError(
            f"no policy server at {self.address} after {self._connect_attempts} attempts "
            f"({type(error).__name__}: {error}); start one with libero-eval-serve"
        )

    @staticmethod
    def _auth_headers() -> dict[str, str] | None:
        key = os.environ.get(API_KEY_ENV)
        return {"Authorization": f"Api-Key {key}"} if key else None

    def reset(self) -> None:
        self._reset_pending = True

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        if self._conn is not None and self._conn.state is not State.OPEN:  # e.g. the server closed it as idle
            self.close()
        if self._conn is None:
            self._connect()
        chunks = []
        for row in range(len(batch)):
            reply = self._request(request_of(batch, row, reset=self._reset_pending))
            self._reset_pending = False
            chunks.append(self._actions_of(reply))
        if len({c.shape for c in chunks}) > 1:
            raise PolicyServerError(f"policy server returned chunks of different shapes: {[c.shape for c in chunks]}")
        return np.stack(chunks)

    def _request(self, request: dict) -> dict:
        try:
            self._conn.send(pack(request))
            reply = self._conn.recv(timeout=self._request_timeout_s)
        except TimeoutError:
            self.close()
            raise PolicyServerError(f"policy server {self.address} sent no reply in {self._request_timeout_s:g} s")
        except ConnectionClosed as exc:
            self.close()
            raise PolicyServerError(f"policy server {self.address} closed the connection ({exc})") from None
        if isinstance(reply, str):  # openpi servers send their traceback as text, then close
            self.close()
            log.error("policy server %s failed:\n%s", self.address, reply)
            last = next((line for line in reversed(reply.strip().splitlines()) if line.strip()), "no message")
            raise PolicyServerError(f"policy server {self.address} failed: {last.strip()}")
        return unpack(reply)

    def _actions_of(self, reply) -> np.ndarray:
        actions = np.asarray(reply.get("actions") if isinstance(reply, dict) else None)
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or not np.issubdtype(actions.dtype, np.number):
            raise PolicyServerError(
                f"policy server {self.address} replied without actions of shape [chunk, {ACTION_DIM}] "
                f"(got {actions.shape if actions.ndim else 'none'})"
            )
        if self.chunk_size is None:
            self.chunk_size = len(actions)
        return actions.astype(np.float32)

    def close(self) -> None:
        if self._conn is not None:
            self._open.close()
            self._conn = None

    def describe(self) -> dict:
        return {"server": self.address, "weights_sha256": self.metadata.get("weights_sha256"),
                "server_metadata": self.metadata}  # fmt: skip
