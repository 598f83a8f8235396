"""The loader that feeds a GPU: `data.workers=auto` sized from the cores, the local ranks and
the shards; the wait per batch it reports (time blocked on it, not time in the step); JPEGs
shipped encoded for `data.decode=gpu`, the device-side resize against the CPU's, the samples a
decoder refuses replaced whole; and the errors that name their key. The CUDA side itself
(decode_jpeg, side-stream copies, device idle time) runs in `bench gpu` part (e)."""
from __future__ import annotations

import io
import itertools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from dbl_scale.config import ConfigError, load_config
from dbl_scale.data import LoaderWait, StreamSpec, TrainLoader, TrainStream, _replace_samples, loader_plan, split_shards
from dbl_scale.preprocess import ImageTransform, check_gpu_decode, gpu_decodable, resize_on_device

MB = 2 ** 20


def test_auto_workers_follow_the_cores_the_local_ranks_and_the_shards():
    assert loader_plan("auto", 100, MB, cores=16, local_ranks=1).workers == 15  # one core for the main process
    assert loader_plan("auto", 100, MB, cores=16, local_ranks=2).workers == 7
    assert loader_plan("auto", 100, MB, cores=16, local_ranks=8).workers == 1
    assert loader_plan("auto", 100, MB, cores=2, local_ranks=4).workers == 1  # never none
    capped = loader_plan("auto", 4, MB, cores=64, local_ranks=1)
    assert capped.workers == 4 and "capped by the 4 shards" in capped.why
    assert loader_plan(3, 100, MB, cores=64, local_ranks=1).workers == 3  # a number is taken as it is
    assert loader_plan(0, 100, MB, cores=64, local_ranks=1).workers == 0


def test_prefetch_keeps_batches_in_flight_within_the_shared_memory():
    assert loader_plan(1, 10, MB, 16, 1).prefetch == 4
    assert loader_plan("auto", 100, MB, 16, 1).prefetch == 2  # 15 workers x 2
    # 15 workers x 2 x 200 MB would need 6 GB of /dev/shm; with 4 GB (half of it usable) only 1 each fits
    assert loader_plan("auto", 100, 200 * MB, 16, 1, shm_bytes=4 * 2 ** 30).prefetch == 1
    assert loader_plan("auto", 100, 200 * MB, 16, 1, shm_bytes=64 * 2 ** 30).prefetch == 2


def test_workers_auto_is_a_config_value_and_bad_ones_name_the_key(shapes_root):
    from dbl_scale.cli.train import check_data

    cfg = load_config(TINY, [f"data.root={shapes_root}", "data.workers=auto"])
    assert cfg.data.workers == "auto"
    check_data(cfg, 2)  # the launcher's data check takes it
    for bad, allowed in (("data.workers=-1", ">= 0"), ("data.workers=many", "'auto'"), ("data.decode=nvjpeg", "'gpu'")):
        with pytest.raises(ConfigError, match=f"config key '{bad.split('=')[0]}'.*{allowed}"):
            load_config(TINY, [bad])
    with pytest.raises(ConfigError, match="config key 'data.decode'.*does not augment"):
        load_config(TINY, ["data.decode=gpu", "data.image.hflip=true"])


def test_the_wait_is_the_time_blocked_on_the_loader_not_the_time_in_the_step(shapes_root, tokenizer):
    """With no worker the step waits for every batch to be made; with one worker that keeps
    ahead of a slow step, it hardly waits at all after the first batch."""
    def run(workers: int, step_s: float, n: int = 6):
        cfg = load_config(TINY, [f"data.root={shapes_root}", f"data.workers={workers}", "data.batch_size=8"])
        loader = TrainLoader(cfg.data, 32, tokenizer, 24, 0, 1, 0)
        waits, t0 = [], time.perf_counter()
        for batch in itertools.islice(loader.batches(), n):
            batches, waited = loader.wait.take()
            assert batches == 1 and set(waited) == {"wait_s"}  # no device: no device idle time
            waits.append(waited["wait_s"])
            time.sleep(step_s)
        return waits, time.perf_counter() - t0

    waits, elapsed = run(0, 0.05)
    assert all(w > 0 for w in waits)  # the batch is made while the step waits
    assert sum(waits) < elapsed - 6 * 0.05 + 0.05  # the step's own time is not counted
    waits, _ = run(1, 0.4)
    assert waits[0] > 0.1 * 0.4  # the worker's start-up is waited for
    assert np.mean(waits[3:]) < 0.1 * 0.4, waits  # then batches are ready when the step asks


def test_loader_wait_take_resets():
    wait = LoaderWait(None)
    for s in (0.1, 0.3):
        wait.ready(s, wait.asked())
    assert wait.take() == (2, {"wait_s": pytest.approx(0.4)})
    assert wait.take() == (0, {"wait_s": 0.0})


def _photo(size=(640, 480), mode="RGB", quality=90, fmt="JPEG") -> bytes:
    """A photo-like test image: a colour gradient with a dark disc left of centre and a bright
    square right of centre, so a crop in the wrong place shows."""
    w, h = size
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([255 * x * np.ones_like(y), 255 * y * np.ones_like(x), 128 * np.ones((h, w, 1))], axis=2)
    yy, xx = np.mgrid[0:h, 0:w]
    arr[(xx - 0.35 * w) ** 2 + (yy - 0.5 * h) ** 2 < (0.15 * h) ** 2] = 20
    arr[(abs(xx - 0.65 * w) < 0.1 * h) & (abs(yy - 0.5 * h) < 0.1 * h)] = 235
    img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_gpu_decodable_takes_whole_rgb_and_grey_jpegs_only():
    jpeg = _photo()
    assert gpu_decodable(jpeg) and gpu_decodable(_photo(mode="L"))
    assert not gpu_decodable(jpeg[: len(jpeg) // 2])  # truncated: the CPU path skips and counts it
    assert not gpu_decodable(_photo(mode="CMYK"))
    assert not gpu_decodable(_photo(fmt="PNG"))
    assert not gpu_decodable(b"\xff\xd8 not a jpeg \xff\xd9")


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_the_device_resize_is_the_cpu_decode_up_to_resampling(resize):
    """`resize_on_device` on a fully decoded image (here on the CPU: the same torch code runs on
    the GPU after decode_jpeg) against the CPU path's decode of the file: within a couple of
    uint8 levels on average; a crop at the left edge instead is far off."""
    data = _photo()
    t = ImageTransform(224, resize=resize)
    full = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1).copy())
    ((idx, ours),) = resize_on_device({0: full, 1: full.clone()}, t).items()
    assert idx == (0, 1) and ours.shape == (2, 3, 224, 224) and ours.dtype == torch.uint8
    ref = torch.from_numpy(t.decode(data)).int()
    assert (ours[0].int() - ref).abs().float().mean() < 2.0
    if resize == "crop":  # the square at the left edge instead of the centre: 80 of 640 px off
        wrong = resize_on_device({0: full[:, :, :480]}, ImageTransform(224, resize="squash"))[(0,)]
        assert (wrong[0].int() - ref).abs().float().mean() > 5.0


def test_encoded_stream_ships_jpeg_bytes_and_decodes_the_rest(shapes_root):
    """Under data.decode=gpu the workers send each JPEG's bytes untouched; what the GPU would not
    take arrives decoded, as the CPU path makes it."""
    urls, _ = split_shards(shapes_root, "train")
    t = ImageTransform(32)
    spec = dict(urls=urls[:2], rank=0, world=1, batch_size=8, transform=t, shuffle_buffer=0, seed=0)
    enc = next(iter(TrainStream(StreamSpec(**spec, encoded=True))))
    plain = next(iter(TrainStream(StreamSpec(**spec))))
    assert isinstance(enc["pixel_values"], list) and all(x.dim() == 1 for x in enc["pixel_values"])
    assert enc["image_ids"].tolist() == plain["image_ids"].tolist()
    decoded = torch.stack([torch.from_numpy(t.decode(x.numpy().tobytes(), fast=True)) for x in enc["pixel_values"]])
    assert torch.equal(decoded, plain["pixel_values"])


def test_undecodable_samples_are_replaced_by_whole_samples_of_the_batch():
    batch = {"captions": [f"c{i}" for i in range(4)], "image_ids": torch.tensor([10, 11, 12, 13]),
             "caption_index": torch.tensor([0, 1, 2, 3]), "input_ids": torch.arange(4)[:, None].repeat(1, 3),
             "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    pixels = torch.arange(4, dtype=torch.uint8)[:, None, None, None].repeat(1, 3, 2, 2)
    out, px = _replace_samples(batch, pixels, [1, 3])
    assert out["captions"] == ["c0", "c0", "c2", "c2"] and out["image_ids"].tolist() == [10, 10, 12, 12]
    assert px[:, 0, 0, 0].tolist() == [0, 0, 2, 2] and out["input_ids"][:, 0].tolist() == [0, 0, 2, 2]


def test_gpu_decode_needs_cuda_and_torchvision_a_config_error_otherwise(shapes_root, tokenizer):
    with pytest.raises(ConfigError, match="config key 'data.decode'.*CUDA device"):
        check_gpu_decode(torch.device("cpu"))
    cfg = load_config(TINY, [f"data.root={shapes_root}", "data.decode=gpu"])
    with pytest.raises(ConfigError, match="config key 'data.decode'"):
        TrainLoader(cfg.data, 32, tokenizer, 24, 0, 1, 0, torch.device("cpu"))
