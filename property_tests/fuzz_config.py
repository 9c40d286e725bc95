"""``lockstep fuzz``'s options: the session's configuration, the example database it names, and
the checks made before any work (a bad option exits 2 naming it)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from . import profiles

MACHINE_MODULE = "lockstep.property_tests.machine"
TURN_S = 120.0    # with the machine, workers alternate turns of at most this long
GRACE_S = 180.0   # for start-up and the last example: a worker still running is stopped then


class FuzzArgumentError(ValueError):
    """A bad ``lockstep fuzz`` option; the message starts with the option's name."""


@dataclass(frozen=True)
class FuzzConfig:
    """One session: ``minutes`` of ``workers`` processes sharing the example database ``db``."""

    minutes: float
    workers: int
    db: str
    out: Path
    profile: str = "fuzz"
    model: str = "oracle"   # or "default", the embedded default model (Lockstep's engine)
    engine: str = "lockstep"   # --engine NAME|module:factory
    device: str = "cpu"        # cpu (the simulated device where the engine has one) or cuda


def open_database(spec: str) -> ExampleDatabase:
    """The example database ``spec`` names: a folder, or ``redis://HOST:PORT`` (``rediss://``)."""
    if "://" not in spec:
        return DirectoryBasedExampleDatabase(spec)
    scheme = spec.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss"):
        raise FuzzArgumentError(f"--db: unsupported scheme {scheme}:// in {spec!r}; give a "
                                "folder or redis://HOST:PORT")
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
        client = redis.Redis.from_url(spec, socket_connect_timeout=5, socket_timeout=30)
    except ImportError:
        raise FuzzArgumentError("--db redis://...: needs the redis client: "
                                "pip install 'lockstep[redis]'") from None
    except ValueError as exc:
        raise FuzzArgumentError(f"--db: bad Redis URL {spec!r}: {exc}") from None
    return RedisExampleDatabase(client)


def validate(config: FuzzConfig) -> None:
    """Check every option before any work: create ``--out`` (and a folder ``--db``), ping a Redis
    ``--db``; raise :class:`FuzzArgumentError`."""
    for ok, message in [
            (math.isfinite(config.minutes) and config.minutes > 0, f"--minutes must be a number "
             f"> 0, got {config.minutes}"),
            (config.workers >= 1, f"--workers must be at least 1, got {config.workers}"),
            (config.profile in profiles.PROFILES, f"--profile must be one of {profiles.PROFILES}"),
            (config.model in ("oracle", "default"), "--model must be oracle or default"),
            (config.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got "
             f"{config.device!r}")]:
        if not ok:
            raise FuzzArgumentError(message)
    from .adapters import EngineSpecError, engine_modes, resolve_engine
    try:
        engine_modes(resolve_engine(config.engine), config.device)
    except EngineSpecError as exc:
        raise FuzzArgumentError(str(exc)) from None
    if config.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise FuzzArgumentError("--device cuda but no CUDA device is available")
    database = open_database(config.db)
    folders = [("--out", Path(config.out))]
    if isinstance(database, DirectoryBasedExampleDatabase):
        folders.append(("--db", Path(config.db)))
    else:
        import redis
        try:
            database.redis.ping()  # type: ignore[attr-defined]
        except redis.RedisError as exc:
            where = urlsplit(config.db)
            raise FuzzArgumentError(f"--db: cannot reach Redis at {where.hostname}:"
                                    f"{where.port or 6379}: {exc}") from None
    for option, path in folders:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FuzzArgumentError(f"{option}: cannot create the folder {str(path)!r}: "
                                    f"{exc.strerror or exc}") from None
        if not os.access(path, os.W_OK):
            raise FuzzArgumentError(f"{option}: the folder {str(path)!r} is not writable")
