"""Plain ZMQ on our loopback, CurveZMQ toward the kernel: for a client that cannot encrypt.

VS Code writes connection files without Curve keys and talks plain ZMQ to the ports in them.
A kernel that must encrypt (it listens on a Slurm node's network) runs with keys the
launcher makes, and this bridge ends the encryption here, on 127.0.0.1, where the client's
own plain ports are anyway. Each channel is a ``zmq.proxy`` in a thread: ROUTER to DEALER
for shell, control, stdin and heartbeat (the client's identity travels as an envelope
frame, which the kernel returns), XPUB to XSUB for iopub (subscriptions pass upstream).
The shell and stdin DEALERs share one identity, since the kernel addresses its stdin
requests to the identity its shell request came from.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import zmq

from .encryption import use_curve
from .tunnel import CHANNELS, LOOPBACK, bind_error

SOCKET_TYPES = {"iopub": (zmq.XPUB, zmq.XSUB)}  # the others: ROUTER in front, DEALER behind
SHARED_IDENTITY = ("shell", "stdin")


class CurveBridge:
    """Five proxies from the client's plain ports to the forwards of an encrypting kernel."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)
        self.context = zmq.Context()
        self._front: dict[str, zmq.Socket[bytes]] = {}
        self._threads: list[threading.Thread] = []

    def bind(self, ports: Mapping[str, int]) -> None:
        """Listen on the client's ports (``shell_port`` …); a LaunchError if one is taken."""
        for name in CHANNELS:
            port = ports[f"{name}_port"]
            sock = self.context.socket(SOCKET_TYPES.get(name, (zmq.ROUTER, zmq.DEALER))[0])
            sock.linger = 0
            try:
                sock.bind(f"tcp://{LOOPBACK}:{port}")
            except zmq.ZMQError as exc:
                sock.close()
                self.close()
                raise bind_error(name, port, OSError(exc.errno, exc.strerror)) from None
            self._front[name] = sock

    def connect(self, ports: Mapping[str, int]) -> None:
        """Start relaying to the kernel's forwarded ports (``shell_port`` …)."""
        identity = os.urandom(8)
        for name in CHANNELS:
            sock = self.context.socket(SOCKET_TYPES.get(name, (zmq.ROUTER, zmq.DEALER))[1])
            sock.linger = 0
            use_curve(sock, self.keys, server=False)
            if name in SHARED_IDENTITY:
                sock.routing_id = identity
            sock.connect(f"tcp://{LOOPBACK}:{ports[f'{name}_port']}")
            thread = threading.Thread(
                target=_relay, args=(self._front[name], sock), name=f"curve-bridge-{name}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop relaying and close every socket (the threads close theirs on ETERM)."""
        if not self._threads:  # sockets that never reached a thread are closed here
            for sock in self._front.values():
                sock.close()
        self._front = {}
        self.context.term()
        for thread in self._threads:
            thread.join(5)
        self._threads = []


def _relay(front: zmq.Socket[bytes], back: zmq.Socket[bytes]) -> None:
    try:
        zmq.proxy(front, back)
    except zmq.ContextTerminated:
        pass  # close(): the end
    finally:
        front.close()
        back.close()
