"""Output of cells that no page here asked for, after a kernel was reattached.

When a restarted Jupyter server reattaches a kept kernel (``reattach``), the kernel's output
from while no server was there, and from a cell still running, belongs to requests of a
page that is gone: JupyterLab shows output only under a request it sent itself, so it would
drop all of it. The session link passes such output on under the next ``execute_request``
the new page sends (held until then, bounded), after a line saying where it comes from. To
do so it rewrites the message's parent and signs it again, with the kernel's own session
key (which this client shares): the one change to kernel messages this package makes.
"""

from __future__ import annotations

import collections
import json
from typing import Any

from jupyter_client.session import Session

DELIMITER = b"<IDS|MSG>"
OUTPUT = {"stream", "display_data", "execute_result", "error", "update_display_data"}
HELD_LIMIT = 64 << 20  # bytes of foreign output held until the page runs a cell


def _part(frames: list[bytes], offset: int) -> dict[str, Any]:
    try:
        value = json.loads(frames[frames.index(DELIMITER) + offset])
    except (ValueError, IndexError):
        return {}
    return value if isinstance(value, dict) else {}


class ForeignOutput:
    """Tells this client's requests from others', and moves others' output under ours."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ours: set[str] = set()  # msg_ids of the requests this client sent
        self.target: dict[str, Any] | None = None  # the header of its latest execute_request
        self.held: collections.deque[list[bytes]] = collections.deque()
        self.held_bytes = 0
        self.announced: set[str] = set()  # foreign requests whose output was introduced

    def upstream(self, frames: list[bytes]) -> list[list[bytes]]:
        """A request of this client (shell); returns held output to hand on now."""
        header = _part(frames, 2)
        if "msg_id" in header:
            self.ours.add(str(header["msg_id"]))
        if header.get("msg_type") != "execute_request":
            return []
        self.target = header
        held, self.held, self.held_bytes = list(self.held), collections.deque(), 0
        return [out for frames in held for out in self._moved(frames)]

    def downstream(self, frames: list[bytes]) -> list[list[bytes]]:
        """A kernel message on iopub: what to hand on now (maybe nothing, held)."""
        header, parent = _part(frames, 2), _part(frames, 3)
        if header.get("msg_type") not in OUTPUT or parent.get("msg_id") in self.ours:
            return [frames]
        if not parent.get("msg_id"):
            return [frames]
        if self.target is None:
            self.held.append(frames)
            self.held_bytes += sum(len(f) for f in frames)
            while self.held_bytes > HELD_LIMIT and len(self.held) > 1:
                self.held_bytes -= sum(len(f) for f in self.held.popleft())
            return []
        return self._moved(frames)

    def _moved(self, frames: list[bytes]) -> list[list[bytes]]:
        """``frames`` under the target request, after an introduction the first time."""
        assert self.target is not None
        origin = str(_part(frames, 3).get("msg_id"))
        out = []
        if origin not in self.announced:
            self.announced.add(origin)
            text = (
                "[jupyter-remote-provisioner] output of a cell run before this page was "
                "connected (while no Jupyter server was, or from the page before):\n"
            )
            note = self.session.msg("stream", {"name": "stderr", "text": text}, parent=self.target)
            out.append(list(self.session.serialize(note, ident=b"stream")))
        i = frames.index(DELIMITER)
        moved = [*frames[: i + 3], self.session.pack(self.target), *frames[i + 4 :]]
        moved[i + 1] = self.session.sign(moved[i + 2 : i + 6])
        out.append(moved)
        return out
