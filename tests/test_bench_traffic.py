"""``lockstep bench --traffic`` on the CPU: every variant serves the whole stream (the same
output tokens), the peer too; the figures and the table come out; bad options exit 2."""
from __future__ import annotations

import json

import pytest
import torch

from lockstep.ci.bench_traffic import TrafficOptions, run_traffic_bench
from lockstep.ci.cli import main
from lockstep.ci.traffic import MIXES, requests_of

torch.set_num_threads(1)


def test_the_streams_are_seeded_and_arrive_over_time():
    a, b = requests_of(MIXES["short"], 512), requests_of(MIXES["short"], 512)
    assert a == b and len(a) == MIXES["short"].requests
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert {len(r.prompt) for r in a} <= set(range(8, 129))
    assert requests_of(MIXES["short"], 512, seed=1) != a


def test_every_variant_serves_the_whole_stream(tmp_path, capsys):
    out = tmp_path / "traffic.json"
    run_traffic_bench(TrafficOptions(device="cpu", shape="tiny", mixes=("tiny",), repeats=2,
                                     out=str(out), plot=str(tmp_path / "traffic.png")))
    result = json.loads(out.read_text())
    [mix] = result["mixes"]
    want = sum(r.max_tokens for r in requests_of(MIXES["tiny"], 512))
    variants = mix["variants"]
    assert set(variants) == {"sync", "async", "async before the fix", "transformers_cb sync"}
    for name, summary in variants.items():
        assert summary["output_tokens"]["all"] == [want] * len(summary["output_tokens"]["all"]), \
            name
        assert summary["output_tok_s"]["median"] > 0 and summary["ttft_ms_median"]["median"] > 0
    assert len(mix["async_over_sync"]["all"]) == 2
    assert (tmp_path / "traffic.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| tiny | async before the fix |" in table and "async / sync tok/s" in table


@pytest.mark.parametrize("args, message", [
    (["--mixes", "huge"], "--mixes must name some of"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--peers", "vllm"], "--peers for --traffic"),
])
def test_bad_options_exit_2_naming_them(args, message, capsys):
    assert main(["bench", "--traffic", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err
