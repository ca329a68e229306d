"""Where a scheduler's dashboard listens: the configured address, bound to a host, and distributed's
fallback to a free port when it is busy, kept quiet. Used by the embedded and the jobqueue clusters."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from distributed.comm.addressing import unparse_host_port

from dparticles import config


def dashboard_address(host: str) -> str | None:
    """Configured dashboard address, bound to ``host`` when it names only a port (distributed reads
    ``":8787"`` as all interfaces; we never want that implicitly). The port is not probed here:
    distributed binds it, and takes another free one if it is busy (see :func:`port_fallback_quiet`)."""
    addr = config.get("cluster.dashboard-address")
    if addr is None:
        return None
    addr = str(addr)
    return f"{unparse_host_port(host)}{addr}" if addr.startswith(":") else addr


@contextlib.contextmanager
def port_fallback_quiet() -> Iterator[None]:
    """distributed binds the dashboard's port itself and, when it is busy (another job's), binds a
    free one instead and warns: the bind cannot race, and the URL is logged, so the warning goes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
        yield
