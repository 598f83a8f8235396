"""The GPU path (`make gpu-check`, benchmarks/gpu.py). On a GPU (marked `gpu`, skipped without
CUDA): the device's losses and gradients equal the CPU's for every method, and the CUDA-only
paths (NCCL's gathered backward, CUDA RNG through a checkpoint, the loader's side-stream copies,
GPU JPEG decoding) give the host's results. On the CPU: the benchmark's dry run walks every part
with tiny sizes, so it cannot rot between the rare GPU sessions; its arithmetic is right."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


def _gpu_parts(tmp_path, parts: list[str], dry: bool) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--parts", *parts, "--work", str(tmp_path / "work"),
                           "--json", str(out)] + ["--dry-run"] * dry, cwd=tmp_path, capture_output=True, text=True,
                          timeout=580, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())["parts"], proc.stdout


@pytest.mark.gpu
@pytest.mark.launch
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_device_agrees_with_the_cpu_and_its_own_paths_work(tmp_path):
    """Parts (d) and (e) on the real device: every method's losses and gradients within the
    parity limit of the CPU's (fp32, TF32 off), and every CUDA-only path as on the host."""
    p, _ = _gpu_parts(tmp_path, ["d", "e"], dry=False)
    assert "error" not in p["d"] and "error" not in p["e"], p
    for name, row in p["d"]["methods"].items():
        assert row["loss_rel"] <= p["d"]["limit"] and row["grad_rel"] <= p["d"]["limit"], (name, row)
    for key in ("gather_backward", "rng_restored", "loader"):
        assert p["e"][key]["ok"], (key, p["e"][key])
    assert p["e"]["loader"]["pixels_on"].startswith("cuda") and p["e"]["gather_backward"]["backend"] == "nccl"
    decode = p["e"]["gpu_decode"]
    assert decode["ok"] if decode["available"] else "torchvision" in decode["why"], decode


@pytest.mark.slow
@pytest.mark.launch
@pytest.mark.timeout(600)
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=580,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    p = result["parts"]
    assert result["dry_run"] and sorted(p) == ["a", "b", "c", "d", "e", "f"]
    assert not [k for k, v in p.items() if "error" in v], p
    # (a) a real training run, evaluated, tracked, and placed among the CPU seeds
    assert 0 < p["a"]["rsum"] <= 600 and p["a"]["loss_curve"] and math.isfinite(p["a"]["rsum_z"])
    assert p["a"]["system_metrics"] is not None
    # (b) every configuration timed in 3 repeats; compiled variants beside eager ones (not ZeRO-3);
    # DeepSpeed runs torch's fused AdamW on bf16 weights (zero*_gpu)
    rows = {r["name"]: r for r in p["b"]["rows"]}
    assert sorted(rows) == sorted(f"{m}, {h}" for m in ("triplet", "dbl momentum")
                                  for h in ("bare loop", "bare loop, compiled", "ZeRO-2", "ZeRO-2, compiled", "ZeRO-3"))
    for r in rows.values():
        assert r["samples_per_s"] > 0 and len(r["step_s_repeats"]) == 3
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"] and r["warmup_s"] > 0
        assert (r["x_eager"] is not None) == r["compiled"] and r["x_bare"] > 0
    for name, stage in (("triplet, ZeRO-2", 2), ("dbl momentum, ZeRO-2, compiled", 2), ("dbl momentum, ZeRO-3", 3)):
        assert rows[name]["optimizer"] == "torch.optim.adamw.AdamW" and rows[name]["fused"], rows[name]
        assert rows[name]["param_dtype"] == "torch.bfloat16" and rows[name]["zero_stage"] == stage
    assert p["b"]["compile"].startswith("torch.compile")
    flops = p["b"]["flops_per_sample"]
    assert 2 * flops["forward"] < flops["train"] < 4 * flops["forward"]  # backward costs about 2 forwards
    # (c) evaluation and mining ran, mining never proposes a pair's own caption or image
    assert p["c"]["mining"]["own_pairs_excluded"] and p["c"]["eval"]["rsum"] >= 0
    assert p["c"]["eval"]["x_product"] > 0 and p["c"]["eval"]["eager_x_product"] > 0  # timed against the product
    # (d) device parity ran for every method (CPU against CPU here: exactly equal)
    assert p["d"]["ok"] and len(p["d"]["methods"]) == 6
    assert all(r["grad_rel"] == 0 and r["tensor_rel_max"] == 0 and r["tensors"] > 0 for r in p["d"]["methods"].values())
    # (e) the device-only paths' logic; no GPU decode without CUDA, and it says so
    assert all(p["e"][k]["ok"] for k in ("gather_backward", "rng_restored", "loader"))
    assert not p["e"]["gpu_decode"]["available"] and "data.decode" in p["e"]["gpu_decode"]["why"]
    # (f) a real run from JPEG shards, against (b)'s synthetic step, with the loader's wait it logged
    f = p["f"]
    assert f["samples_per_s"] > 0 and f["x_synthetic"] > 0 and f["compiled"]
    assert f["wait_s"] >= 0 and 0 <= f["wait_share"] <= 1 and f["device_idle_s"] is None
    assert "data.workers=auto" in f["loader_plan"] and f["images"] == 64
    assert "bench gpu:" in proc.stdout and "(e) gathered backward over gloo: ok" in proc.stdout
    assert "(f) dbl-scale train from 64 JPEGs" in proc.stdout


def test_the_peak_is_looked_up_by_the_exact_device_name():
    from benchmarks.gpu import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4  # SXM
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.5 and peak_tflops("NVIDIA H100 NVL")[0] == 835.5
    assert peak_tflops("NVIDIA H200")[0] == 989.4 and peak_tflops("NVIDIA H200 NVL")[0] == 835.5
    assert peak_tflops("NVIDIA A100-SXM4-40GB")[0] == peak_tflops("NVIDIA A100 80GB PCIe")[0] == 312.0
    assert peak_tflops("NVIDIA L40S")[0] == 362.05
    value, why = peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb")  # a slice of a chip is not the chip
    assert value is None and "--peak-tflops" in why and "MIG 1g.10gb" in why
    assert peak_tflops("Some Future GPU", 1000.0) == (1000.0, "--peak-tflops")


def test_mfu_counts_trained_samples_and_the_anchor_apart():
    """MFU is the trained branch's forward + backward per sample against the peak; DBL's anchor
    forward has its own column; the compiled row's ratio to eager is the median of the paired
    repeats; the fastest bare loop is the yardstick."""
    from benchmarks.gpu import _ratios, _row, format_throughput

    flops = {"train": 120e9, "forward": 40e9}
    m = lambda reps: {"step_s_repeats": reps, "warmup_s": 1.0, "peak_bytes": 2 ** 30}  # noqa: E731
    rows = [_row("triplet", "bare loop", "eager", 1000, m([0.50, 0.52, 0.60]), flops, 989.4),
            _row("triplet", "bare loop", "compiled", 1000, m([0.40, 0.41, 0.50]), flops, 989.4),
            _row("triplet", "ZeRO-2", "compiled", 1000, m([0.44, 0.45, 0.46]), flops, 989.4),
            _row("dbl momentum", "bare loop", "eager", 1000, m([0.60, 0.60, 0.60]), flops, 989.4),
            _row("dbl momentum", "ZeRO-2", "eager", 1000, m([0.66, 0.66, 0.66]), flops, 989.4)]
    _ratios(rows)
    trip, dbl = rows[2], rows[4]
    assert trip["step_s"] == 0.45 and trip["mfu"] == pytest.approx(120e9 * 1000 / 0.45 / 989.4e12)
    assert trip["anchor_mfu"] is None and dbl["anchor_mfu"] == pytest.approx(40e9 * 1000 / 0.66 / 989.4e12)
    assert dbl["mfu"] == pytest.approx(120e9 * 1000 / 0.66 / 989.4e12)  # the anchor is not useful work
    assert rows[1]["x_eager"] == pytest.approx(0.8)  # the median of 0.4/0.5, 0.41/0.52 and 0.5/0.6
    assert trip["x_bare"] == pytest.approx(0.45 / 0.41) and rows[0]["x_eager"] is None
    assert dbl["x_triplet"] is None and dbl["x_bare"] == pytest.approx(1.1)
    table = "\n".join(format_throughput({"model": "m", "batch": 1000, "batch_how": "h", "flops_per_sample": flops,
                                         "peak_tflops": 989.4, "peak_source": "s", "repeats": 3,
                                         "steps_per_repeat": 5, "compile": "c", "rows": rows}))
    line = next(x for x in table.splitlines() if "dbl momentum, ZeRO-2" in x)
    assert line.split()[3:5] == [f"{100 * dbl['mfu']:.1f}%", f"{100 * dbl['anchor_mfu']:.1f}%"]


def test_against_cpu_seeds_is_a_z_score_per_log_step():
    from benchmarks.gpu import against_cpu_seeds

    record = {"loss_curve": {"triplet": {"steps": [10, 20], "rsum": [400.0, 410.0, 420.0],
                                         "loss": [[5.0, 2.0], [6.0, 3.0], [7.0, 4.0]]}}}
    out = against_cpu_seeds(430.0, {10: 6.0, 20: 7.0, 30: 1.0}, record)
    assert out["rsum_z"] == pytest.approx(2.0)  # (430 - 410) / 10
    assert out["loss_steps_compared"] == 2 and out["loss_z_max"] == pytest.approx(4.0)  # (7 - 3) / 1
    assert out["loss_within_3std"] == 1
