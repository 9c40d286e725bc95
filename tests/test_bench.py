"""``lockstep bench``: arguments checked before any work, honest timing, nothing left behind."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lockstep.ci.bench import TINY, BenchOptions, BenchUsageError, summary


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("lockstep-bench-*")}


@pytest.mark.parametrize("args,option", [
    (["--batch-sizes", "1,x"], "--batch-sizes"), (["--batch-sizes", "0"], "--batch-sizes"),
    (["--short", "8", "--long", "4"], "--short"), (["--repeats", "0"], "--repeats"),
    (["--out", "no-such-folder/result.json"], "--out"),
    (["--plot", "no-such-folder/plot.png"], "--plot"),
    (["--peers", "vllm"], "peers")])
def test_bad_arguments_exit_2_naming_the_option_before_any_work(tmp_path, args, option):
    before = leftovers()
    proc = bench("--device", "cpu", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert option in proc.stderr and "Traceback" not in proc.stderr
    assert "writing a random" not in proc.stderr and leftovers() == before


def test_device_cuda_without_cuda_is_a_clear_usage_error(tmp_path):
    if torch.cuda.is_available():
        BenchOptions(device="cuda").validate()  # accepted where there is a GPU
        return
    proc = bench("--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--device cuda but no CUDA device is available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_cpu_run_reports_medians_and_spreads_versions_and_cleans_up(tmp_path):
    before = leftovers()
    proc = bench("--device", "cpu", "--shape", "tiny", "--batch-sizes", "1,2", "--short", "4",
                 "--long", "24", "--repeats", "3", "--peers", "transformers_eager",
                 "--out", "r.json", "--plot", "r.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert {"torch", "triton", "cuda", "commit"} <= result.keys()
    assert result["torch"] == torch.__version__
    for row in result["rows"]:
        for mode in ("sync", "async"):
            samples = row[f"{mode}_samples_ms"]
            assert len(samples) == 3 and min(samples) > 0
            assert row[f"{mode}_tpot_ms"] == sorted(samples)[1]
            assert row[f"{mode}_spread"] >= 0
        assert row["transformers_eager_tpot_ms"] > 0
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    table = proc.stdout
    assert "HBM floor" not in table and "GPU busy" not in table and "hbm_floor_ms" not in result
    assert "repetition 3/3" in proc.stderr  # progress while it runs
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers() == before


def test_the_tiny_shape_has_its_special_ids_inside_its_vocabulary():
    assert 0 <= TINY["bos_token_id"] < TINY["vocab_size"]
    assert 0 <= TINY["eos_token_id"] < TINY["vocab_size"]


def test_summary_is_a_median_and_a_spread():
    s = summary([0.003, 0.001, 0.002])
    assert s["median_ms"] == pytest.approx(2.0) and s["spread"] == pytest.approx(1.0)


def test_options_validate_in_process_too():
    with pytest.raises(BenchUsageError, match="--short"):
        BenchOptions(device="cpu", short=5, long=5).validate()


def test_the_host_is_recorded_with_a_calibration_figure():
    from lockstep.ci.host import describe, host_info
    host = host_info()
    assert host["cpu_model"] and host["cores"] >= 1
    assert host["calibration_ms"] > 0 and host["calibration_spread"] >= 0
    assert describe(host).startswith(f"host: {host['cpu_model']}, {host['cores']} cores")


def test_a_cpu_guard_bench_reports_spreads_the_host_and_versions(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lockstep", "guard-bench", "--device", "cpu",
                           "--shape", "tiny", "--batch-sizes", "1", "--repeats", "2", "--out",
                           "g.json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["repeats"] == 2 and {"torch", "commit", "host"} <= result.keys()
    assert result["host"]["calibration_ms"] > 0
    for row in result["rows"]:
        for mode in ("off", "deep", "sampled", "off_light_phase", "light"):
            assert row[f"tpot_ms_{mode}"] > 0 and row[f"spread_{mode}"] >= 0, (mode, row)
    assert "host: " in proc.stdout and " ± " in proc.stdout
