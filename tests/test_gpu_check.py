"""`dbl-scale bench gpu` (`make gpu-check`): its dry run on the CPU walks every part of the GPU
check with tiny sizes (the same code apart from the device), so the check cannot rot between
the rare GPU sessions; and the comparison with the CPU seeds is right."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.timeout(600)
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli.main", "bench", "gpu", "--dry-run",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=580,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    p = result["parts"]
    assert result["dry_run"] and sorted(p) == ["a", "b", "c", "d", "e"]
    assert not [k for k, v in p.items() if "error" in v], p
    # (a) a real training run, evaluated, tracked, and placed among the CPU seeds
    assert 0 < p["a"]["rsum"] <= 600 and p["a"]["loss_curve"] and math.isfinite(p["a"]["rsum_z"])
    assert p["a"]["system_metrics"] is not None
    # (b) every configuration timed; DeepSpeed runs torch's fused AdamW on bf16 weights (zero*_gpu)
    rows = {r["name"]: r for r in p["b"]["rows"]}
    assert sorted(rows) == sorted(f"{m}, {h}" for m in ("triplet", "dbl momentum")
                                  for h in ("bare loop", "ZeRO-2", "ZeRO-3"))
    assert all(r["samples_per_s"] > 0 for r in rows.values())
    for name in ("triplet, ZeRO-2", "dbl momentum, ZeRO-3"):
        assert rows[name]["optimizer"] == "torch.optim.adamw.AdamW" and rows[name]["fused"], rows[name]
        assert rows[name]["param_dtype"] == "torch.bfloat16" and rows[name]["zero_stage"] == int(name[-1])
    flops = p["b"]["flops_per_sample"]
    assert 2 * flops["forward"] < flops["train"] < 4 * flops["forward"]  # backward costs about 2 forwards
    # (c) evaluation and mining ran, mining never proposes a pair's own caption or image
    assert p["c"]["mining"]["own_pairs_excluded"] and p["c"]["eval"]["rsum"] >= 0
    # (d) device parity ran for every method (CPU against CPU here: exactly equal)
    assert p["d"]["ok"] and len(p["d"]["methods"]) == 6
    assert all(r["grad_rel"] == 0 and r["tensor_rel_max"] == 0 and r["tensors"] > 0 for r in p["d"]["methods"].values())
    # (e) the device-only paths' logic
    assert all(p["e"][k]["ok"] for k in ("gather_backward", "rng_restored", "loader"))
    assert "bench gpu:" in proc.stdout and "(e) gathered backward over gloo: ok" in proc.stdout


def test_against_cpu_seeds_is_a_z_score_per_log_step():
    from dbl_scale.cli.bench.gpu import against_cpu_seeds

    record = {"loss_curve": {"triplet": {"steps": [10, 20], "rsum": [400.0, 410.0, 420.0],
                                         "loss": [[5.0, 2.0], [6.0, 3.0], [7.0, 4.0]]}}}
    out = against_cpu_seeds(430.0, {10: 6.0, 20: 7.0, 30: 1.0}, record)
    assert out["rsum_z"] == pytest.approx(2.0)  # (430 - 410) / 10
    assert out["loss_steps_compared"] == 2 and out["loss_z_max"] == pytest.approx(4.0)  # (7 - 3) / 1
    assert out["loss_within_3std"] == 1
