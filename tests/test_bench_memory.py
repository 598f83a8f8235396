"""`dbl-scale bench memory` on 2 CPU ranks with tiny towers: the byte counts by role follow
what each ZeRO stage partitions, and every DBL scenario's step is timed against the baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY

pytestmark = pytest.mark.launch  # every test here starts a process

TINY_BENCH = ["model.vision.hidden=64", "model.vision.layers=2", "model.vision.heads=2",
              "model.text.hidden=64", "model.text.layers=2", "model.text.heads=2", "model.embed_dim=64"]


def _bench(shapes_root, out, *flags):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "bench", "memory", "--config", TINY,
                           "--rounds", "2", "--warmup", "1", "--json", str(out), *flags, f"data.root={shapes_root}",
                           *TINY_BENCH], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def result(shapes_root, tmp_path_factory):
    return _bench(shapes_root, tmp_path_factory.mktemp("bench_memory") / "result.json")


def _rows(result):
    rows = {r["stage"]: r for r in result["memory"]}
    assert sorted(rows) == [0, 1, 2, 3] and result["world"] == 2
    assert len({r["n_params"] for r in rows.values()}) == 1
    return rows, rows[0]["n_params"], {s: r["params"] + r["grads"] + r["optimizer"] for s, r in rows.items()}


def test_zero_stages_partition_what_they_promise(result):
    rows, n, total = _rows(result[0])
    z0 = rows[0]
    # fp32: ZeRO 0-2 keep every weight; ZeRO-3 half of each (plus padding to a multiple of the ranks)
    for stage in (0, 1, 2):
        assert rows[stage]["params"] == 4 * n
    assert 0.5 <= rows[3]["params"] / z0["params"] <= 0.52
    # without ZeRO: full gradients and Adam's two moments of every weight (the master is the module)
    assert z0["grads"] >= 4 * n and z0["optimizer"] == pytest.approx(8 * n, rel=0.01)  # + Adam's step counts
    # ZeRO 1-3: the moments of this rank's half, plus DeepSpeed's fp32 master copy of that half
    # (kept even when the module is fp32); gradients reduced to this rank's half
    for stage in (1, 2, 3):
        assert rows[stage]["optimizer"] == pytest.approx(0.5 * (8 * n + 4 * n), rel=0.02)
        assert rows[stage]["grads"] <= 0.6 * z0["grads"]
    assert total[3] / total[0] <= 0.65 and total[3] < total[2] <= total[1] < total[0]


def test_bf16_zero3_holds_half_of_everything(shapes_root, tmp_path):
    """bf16: ZeRO-0 keeps bf16 weights and gradients plus an fp32 master and moments of all
    of them; ZeRO-3 keeps half of each, so half the bytes."""
    result, _ = _bench(shapes_root, tmp_path / "bf16.json", "--bf16", "--skip-time")
    rows, n, total = _rows(result)
    assert rows[0]["params"] == 2 * n and rows[0]["optimizer"] == pytest.approx(12 * n, rel=0.01)
    for key in ("params", "grads", "optimizer"):
        assert 0.49 <= rows[3][key] / rows[0][key] <= 0.52, key
    assert total[3] / total[0] <= 0.52
    assert "time" not in result


def test_every_scenario_timed_against_the_baseline(result):
    times = result[0]["time"]
    assert list(times) == ["triplet (baseline)", "dbl momentum", "dbl online", "dbl offline"]
    assert times["dbl momentum"]["branches"] == "ema,trained"
    assert times["dbl offline"]["branches"] == "frozen,trained"
    online = times["dbl online"]["branches"].split(",")
    assert len(online) >= 2 and set(online) == {"trained"}
    assert all(t["ms"] > 0 for t in times.values())
    out = result[1]
    assert "ZeRO-3" in out and "momentum / baseline =" in out and "x baseline" in out
