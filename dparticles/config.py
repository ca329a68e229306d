"""Settings in three tiers: an explicit keyword > the user's dask config > packaged defaults.

The packaged defaults (``dparticles/dparticles.yaml``) are merged into ``dask.config`` at
import with ``dask.config.update_defaults``, as dask-jobqueue does, so a site or a user sets
``dparticles.*`` keys once (YAML in ``~/.config/dask``, ``DASK_DPARTICLES__*`` variables or
``dask.config.set``) and every job, worker and notebook sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from dparticles.errors import ParticleError

DEFAULTS_FILE = Path(__file__).with_name("dparticles.yaml")


def _load_defaults() -> dict[str, Any]:
    """Merge the packaged defaults under any user settings already in dask.config."""
    with open(DEFAULTS_FILE) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)
    return defaults


DEFAULTS = _load_defaults()


def get(key: str, override: Any = None) -> Any:
    """Value of setting ``key`` (e.g. ``"batch-size"``, ``"zarr.codec"``).

    ``override`` wins when it is not None (a keyword argument or command-line flag);
    otherwise the user's ``dparticles.<key>`` from dask.config, which falls back to
    the packaged default (also when a ``dask.config.set`` that began before this module was
    imported has removed it on exit). ``-`` and ``_`` are interchangeable in keys.
    """
    if override is not None:
        return override
    try:
        return dask.config.get(f"dparticles.{key}")
    except KeyError:  # a dask.config.set made before this module merged its defaults took them away on exit
        pass
    try:
        return dask.config.get(key, config=DEFAULTS["dparticles"])
    except KeyError:
        raise KeyError(f"unknown dparticles setting {key!r}; known: {', '.join(_keys(DEFAULTS['dparticles']))}") from None


def _keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of all leaves of a nested settings dict."""
    out: list[str] = []
    for k, v in tree.items():
        out.extend(_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    return out


def seconds(key: str, override: Any = None, name: str | None = None) -> float:
    """Setting ``key`` as a positive number of seconds (``30s``, ``10 minutes``, a number; ``override``
    as in :func:`get`), or a ParticleError naming it (as ``name``, default the key's last part)."""
    value = get(key, override)
    try:
        result = parse_timedelta(value, default="s")
    except (ValueError, TypeError, KeyError):
        result = None
    if not isinstance(result, int | float) or isinstance(result, bool) or result <= 0:
        raise ParticleError(f"{name or key.rsplit('.', 1)[-1]} must be a positive duration such as 30s, got "
                            f"{value!r} (dparticles.{key} in the dask config)")
    return float(result)
