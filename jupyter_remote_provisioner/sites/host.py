"""A plain SSH host: the kernel runs where the connection ends; nothing to set up or undo."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Spot, stop_through_agent

if TYPE_CHECKING:
    from ..errors import RemoteKernelError
    from ..kernel_settings import KernelSettings
    from ..ssh import Connection


class HostSite:
    """The target host itself."""

    def __init__(self, settings: KernelSettings) -> None:
        self.settings = settings
        self.spot = Spot(settings.target.host.label)

    async def place(self, conn: Connection, renew: bool) -> Spot:
        return self.spot

    async def ended(self, conn: Connection) -> str | None:
        return None

    async def explain(self, conn: Connection, error: RemoteKernelError) -> RemoteKernelError:
        return error

    async def release(self, conn: Connection) -> None:
        return None

    async def stop_kernel(self, conn: Connection, kernel_id: str) -> str:
        return await stop_through_agent(conn, self.settings, self.spot, kernel_id)
