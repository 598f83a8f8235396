"""`dbl-scale bench memory` on 2 CPU ranks with tiny towers: the byte counts by role follow
what each ZeRO stage partitions, and every DBL scenario's step is timed against the baseline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY

TINY_BENCH = ["model.vision.hidden=64", "model.vision.layers=2", "model.vision.heads=2",
              "model.text.hidden=64", "model.text.layers=2", "model.text.heads=2", "model.embed_dim=64"]


@pytest.fixture(scope="module")
def result(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_memory") / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "bench", "memory", "--config", TINY,
                           "--rounds", "2", "--warmup", "1", "--json", str(out), f"data.root={shapes_root}",
                           *TINY_BENCH], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


def test_zero_stages_partition_what_they_promise(result):
    rows = {r["stage"]: r for r in result[0]["memory"]}
    assert sorted(rows) == [0, 1, 2, 3] and result[0]["world"] == 2
    z0 = rows[0]
    n = z0["n_params"]
    assert all(r["n_params"] == n for r in rows.values())
    # fp32: ZeRO 0-2 keep every weight; ZeRO-3 half of each (plus padding to a multiple of the ranks)
    for stage in (0, 1, 2):
        assert rows[stage]["params"] == 4 * n
    assert 0.5 <= rows[3]["params"] / z0["params"] <= 0.52
    # without ZeRO: full gradients and Adam's two moments of every weight (the master is the module)
    assert z0["grads"] >= 4 * n and z0["optimizer"] == pytest.approx(8 * n, rel=0.01)  # + Adam's step counts
    # ZeRO 1-3: the moments of this rank's half (ZeRO 1-2 also copy their half of the fp32
    # master; ZeRO-3 shares it with the module), gradients reduced to this rank's half
    for stage in (1, 2, 3):
        assert rows[stage]["optimizer"] <= 0.76 * z0["optimizer"]
        assert rows[stage]["grads"] <= 0.6 * z0["grads"]
    assert rows[3]["optimizer"] == pytest.approx(0.5 * z0["optimizer"], rel=0.02)
    total = {s: r["params"] + r["grads"] + r["optimizer"] for s, r in rows.items()}
    assert total[3] / total[0] <= 0.52 and total[3] < total[2] <= total[1] < total[0]


def test_every_scenario_timed_against_the_baseline(result):
    times = result[0]["time"]
    assert list(times) == ["triplet (baseline)", "dbl momentum", "dbl online", "dbl offline"]
    assert times["dbl momentum"]["branches"] == "ema,trained"
    assert times["dbl offline"]["branches"] == "frozen,trained"
    assert times["dbl online"]["branches"].split(",") == ["trained"] * len(times["dbl online"]["branches"].split(","))
    assert all(t["ms"] > 0 for t in times.values())
    out = result[1]
    assert "ZeRO-3" in out and "momentum / baseline =" in out and "x baseline" in out
