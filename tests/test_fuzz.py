"""``lockstep fuzz``: option checks, a short session on a folder database, and a failure shared
between two processes through a real Redis server."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from lockstep.ci.cli import main

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.M)
FAIL = re.compile(r"FAIL (\w+) run (\d+), first failed at example (\d+) of the run")
# A bug planted from outside the engine, in every process of a session (the spawned workers
# too): when a step samples two or more rows, the last one's token is off by one. Requests
# alone (the solo reference) and the simplest workload (one request) never see it.
FAULT = """
import lockstep.engine.scheduler as scheduler
_update = scheduler.Scheduler.update_from_output
def update_from_output(self, out, sampled, logprobs):
    rows = [i for i, row in enumerate(out.rows) if row.samples and sampled[i] is not None]
    if len(rows) >= 2:
        sampled = list(sampled)
        sampled[rows[-1]] = (sampled[rows[-1]] + 1) % 512
    return _update(self, out, sampled, logprobs)
scheduler.Scheduler.update_from_output = update_from_output
"""
# The differential property with only hypothesis' reuse phase fails only on what the database
# already holds: on each Redis URL given.
REUSE_ONLY = """
import sys
import unittest
import redis
from hypothesis import Phase, settings
from hypothesis.extra.redis import RedisExampleDatabase
from lockstep.property_tests.properties import PropertyFailure, async_matches_sync_property
for url in sys.argv[1:]:
    database = RedisExampleDatabase(redis.Redis.from_url(url))
    test = settings(database=database, phases=[Phase.reuse], deadline=None)(
        async_matches_sync_property("oracle"))
    try:
        test()
    except PropertyFailure as failure:
        print(url, "replayed:", str(failure).splitlines()[0])
    except unittest.SkipTest:  # hypothesis ran no example at all
        print(url, "nothing to replay")
"""


def python(args: list, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def fuzz(*args, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return python(["-m", "lockstep", "fuzz", *args], cwd, env)


def workers(stdout: str) -> dict[int, tuple[int, int, int]]:
    return {int(w): (int(d), int(m), int(f)) for w, d, m, f in ROW.findall(stdout)}


@pytest.mark.parametrize("args, option", [
    (["--minutes", "0"], "--minutes"), (["--minutes", "-1"], "--minutes"),
    (["--workers", "0"], "--workers"), (["--db", "ftp://host/db"], "--db")])
def test_bad_options_exit_2_naming_the_option_before_any_work(tmp_path, capsys, args, option):
    base = {"--minutes": "0.1", "--workers": "1", "--db": str(tmp_path / "db"),
            "--out": str(tmp_path / "out")}
    base.update(dict(zip(args[::2], args[1::2])))
    assert main(["fuzz", *(x for kv in base.items() for x in kv)]) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "db").exists()


def test_an_out_folder_that_cannot_be_created_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["fuzz", "--minutes", "0.1", "--workers", "1", "--db", str(tmp_path / "db"),
                 "--out", str(tmp_path / "file" / "out")]) == 2
    assert "--out: cannot create the folder" in capsys.readouterr().err


def test_an_unreachable_redis_exits_2(tmp_path, capsys):
    pytest.importorskip("redis", reason="the redis client is the `redis` extra")
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["fuzz", "--minutes", "0.1", "--workers", "1", "--db",
                 f"redis://127.0.0.1:{port}", "--out", str(tmp_path / "out")]) == 2
    assert f"--db: cannot reach Redis at 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_short_session_on_two_workers_fills_the_folder_database(tmp_path):
    db, out = tmp_path / "db", tmp_path / "out"
    session = fuzz("--minutes", "0.15", "--workers", "2", "--db", db, "--out", out, cwd=tmp_path)
    assert session.returncode == 0, session.stdout + session.stderr
    rows = workers(session.stdout)
    assert set(rows) == {0, 1}, session.stdout
    assert all(d > 0 and f == 0 for d, _, f in rows.values()), session.stdout
    for line in ("differential examples per second:", "sync+async example pairs per second:",
                 "hard states (examples reaching each):"):
        assert line in session.stdout
    assert any(path.is_file() for path in db.rglob("*")), "nothing saved in the database"
    assert (out / "worker-0" / "log.txt").exists() and (out / "worker-1" / "log.txt").exists()


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on loopback, in tmp_path, persisting nothing."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs the redis-server binary (the redis-server system package)")
    pytest.importorskip("redis", reason="the redis client is the `redis` extra")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}", client
    proc.terminate()
    proc.wait(timeout=10)


def test_a_failure_found_by_one_process_is_replayed_at_once_by_another_through_redis(
        tmp_path, redis_url):
    url, client = redis_url
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(textwrap.dedent(FAULT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "fault"), *filter(None, [os.environ.get("PYTHONPATH")])])}

    first = fuzz("--minutes", "0.2", "--workers", "1", "--db", url, "--out", tmp_path / "first",
                 cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert any(m[0] == "differential" for m in FAIL.findall(first.stdout)), first.stdout
    keys = client.keys(b"hypothesis-example:*")
    primary = [k for k in keys if not k.endswith((b".secondary", b".pareto"))]
    assert primary and any(client.scard(k) for k in primary), keys

    second = fuzz("--minutes", "0.1", "--workers", "1", "--db", url, "--out",
                  tmp_path / "second", cwd=tmp_path, env=env)
    assert second.returncode == 1, second.stdout + second.stderr
    target, run, example = FAIL.findall(second.stdout)[0]
    assert (target, run, example) == ("differential", "0", "1"), second.stdout
    assert (tmp_path / "second" / "worker-0" / "run-0" / "async_matches_sync-oracle.json").exists()

    # the very test of the suite replays it from Redis with nothing but the reuse phase, and
    # an empty database (another Redis db number) has nothing to replay
    script = tmp_path / "reuse_only.py"
    script.write_text(REUSE_ONLY)
    replay = python([script, url, url + "/1"], tmp_path, env)
    assert f"{url} replayed: Divergence" in replay.stdout, replay.stdout + replay.stderr
    assert f"{url}/1 nothing to replay" in replay.stdout, replay.stdout + replay.stderr


# An engine whose 12th step in a process ends in a device-side assert: the CUDA context of that
# process is lost for good (every later CUDA call fails), as after a real out-of-bounds index.
STICKY = """
import sync_guard
import torch
from lockstep.property_tests.engine_under_test import LockstepEngine, lockstep_engine

class Asserting(LockstepEngine):
    steps_in_process = 0

    def step(self):
        Asserting.steps_in_process += 1
        if Asserting.steps_in_process == 12:
            with sync_guard.allow("the planted device-side assert surfaces here"):
                torch.zeros(4, device="cuda")[torch.tensor([9], device="cuda")]
                torch.cuda.synchronize()
        return super().step()

def factory(spec, mode):
    return Asserting(spec, mode)

factory.capabilities = lockstep_engine.capabilities
"""


@pytest.mark.gpu
def test_a_worker_that_loses_its_cuda_context_goes_on_in_a_fresh_process(tmp_path):
    (tmp_path / "sticky_adapter.py").write_text(STICKY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    session = fuzz("--minutes", "0.6", "--workers", "1", "--db", tmp_path / "db", "--out",
                   tmp_path / "out", "--engine", "sticky_adapter:factory", "--device", "cuda",
                   cwd=tmp_path, env=env)
    out = session.stdout
    restarts = out.count("goes on in a fresh process")
    failures = workers(out)[0][2]
    assert session.returncode == 1 and restarts >= 1, out + session.stderr
    # one failure per lost context, not one per run for the rest of the session
    assert restarts <= failures <= restarts + 1, out
    log = (tmp_path / "out" / "worker-0" / "log.txt").read_text()
    assert "the CUDA context is lost after" in log and "device-side assert" in log, log[-3000:]
    # the fresh process went on: examples ran after the restart, in run folders of their own
    assert any(p.name.startswith("run-1.") for p in (tmp_path / "out" / "worker-0").iterdir()) \
        or workers(out)[0][0] > 8, out


def test_a_restarted_workers_counts_add_to_those_of_its_lost_process():
    import io
    from lockstep.property_tests.fuzz import _Tally
    tally, stream = _Tally(), io.StringIO()
    tally.take(("progress", 0, ({"differential": 5}, {"differential": 2.0}, {"a": 1})), stream,
               False)
    tally.take(("restart", 0, ({"differential": 7}, {"differential": 3.0}, {"a": 2})), stream,
               False)
    assert tally.restart and not tally.done
    tally.take(("progress", 0, ({"differential": 4}, {"differential": 1.0}, {"b": 1})), stream,
               False)
    assert (tally.examples, tally.seconds, tally.states) == (
        {"differential": 11}, {"differential": 4.0}, {"a": 2, "b": 1})
    assert "goes on in a fresh process" in stream.getvalue()


def test_the_fault_machine_is_a_target_of_its_own_counting_its_programs(tmp_path, monkeypatch):
    import queue

    from hypothesis import settings

    from lockstep.property_tests import fault_machine, faults, machine, properties
    from lockstep.property_tests.fuzz_config import FuzzConfig
    from lockstep.property_tests.fuzz_worker import _Worker
    # a worker patches these in its own process: here they come back after the test
    for owner, name in [(properties, "check_workload"), (properties, "event"),
                        (faults, "check_fault"), (machine, "event"), (fault_machine, "event"),
                        (machine.EngineMachine, "__init__"),
                        (fault_machine.FaultMachine, "__init__")]:
        monkeypatch.setattr(owner, name, getattr(owner, name))
    monkeypatch.setenv(properties.REPLAY_DIR_ENV, str(tmp_path / "replays"))
    config = FuzzConfig(minutes=1, workers=1, db=str(tmp_path / "db"), out=tmp_path / "out")
    worker = _Worker(0, config, "seed", queue.Queue(), tmp_path / "out")
    worker.profile = settings(worker.profile, max_examples=3)   # short runs, no deadline
    before = fault_machine._tally.programs
    worker._run("fault_machine", 0)
    ran = fault_machine._tally.programs - before
    # its programs count as its own examples, not as the plain machine's
    assert ran >= 3 and worker.examples == {"fault_machine": ran}, (ran, worker.examples)
    assert fault_machine.event == worker._event   # its hard states are counted too
    assert not worker.failed and not list((tmp_path / "out").glob("run-*/*.json"))
