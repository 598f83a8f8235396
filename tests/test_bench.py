"""`dbl-scale bench loss` at toy sizes: every loss is measured, ratios and memory make sense."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from dbl_scale import distributed
from dbl_scale.cli.bench import add_parser as add_bench_parser
from dbl_scale.cli.bench.loss import BOOST_TERMS, LOSSES, bench_losses, format_bench


@pytest.fixture(scope="module")
def rows():
    return bench_losses(local_batches=(8, 16, 64), global_batches=(32,), dim=32, repeats=1, warmup=0)


def test_every_loss_measured_at_every_size(rows):
    sizes = [(8, 32), (16, 32)]  # B = 64 > N is skipped
    assert sorted({(r["local"], r["global"]) for r in rows}) == sorted(sizes)
    for size in sizes:
        at = {r["loss"]: r for r in rows if (r["local"], r["global"]) == size}
        assert set(at) == set(LOSSES)
        for r in at.values():
            assert r["ms"] > 0 and r["peak_mib"] > 0, r
            assert math.isfinite(r["value"]), r
        assert at["triplet"]["time_ratio"] == 1.0 and at["triplet"]["mem_ratio"] == 1.0
        for r in at.values():
            assert r["time_ratio"] == pytest.approx(r["ms"] / at["triplet"]["ms"])
            assert r["mem_ratio"] == pytest.approx(r["peak_mib"] / at["triplet"]["peak_mib"])


def test_memory_grows_with_the_batch(rows):
    small = {r["loss"]: r["peak_mib"] for r in rows if (r["local"], r["global"]) == (8, 32)}
    large = {r["loss"]: r["peak_mib"] for r in rows if (r["local"], r["global"]) == (16, 32)}
    for name in LOSSES:
        assert large[name] > small[name], (name, small[name], large[name])


def test_format_names_every_loss(rows):
    text = format_bench(rows)
    for name in LOSSES:
        assert name in text
    assert "worst" in text and any(name in text.splitlines()[-1] for name in BOOST_TERMS)


def test_simulated_gathers_are_restored(rows):
    assert distributed.gather_with_grad.__module__ == "dbl_scale.distributed"
    assert distributed.gather_no_grad.__module__ == "dbl_scale.distributed"
    assert distributed.rank() == 0


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "rows.json"
    args = parser.parse_args(["bench", "loss", "--local", "8", "--global", "16", "--dim", "16", "--repeats", "1",
                              "--warmup", "0", "--threads", "1", "--quiet", "--json", str(out)])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "torch" in printed and "dbl_relative_soft" in printed
    saved = json.loads(out.read_text())["rows"]
    assert {r["loss"] for r in saved} == set(LOSSES)
