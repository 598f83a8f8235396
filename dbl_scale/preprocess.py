"""Images and captions into the towers' inputs, the one way training, evaluation, mining and
export all do it: `ImageTransform` (resize keeping the aspect ratio, centre crop, the
checkpoint's mean and std; seeded train-time crop and flip), `RegionFeatures` for precomp
towers, `Tokenize` for captions, and the run's settings for them (`image_transform`,
`resolve_image_config`, `preprocessor_config` for Hugging Face's image processor)."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .hub import local_folder
from .errors import ConfigError, DataError

# CLIP's image statistics; any fixed choice works for towers trained from scratch.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image -> the vision tower's input, the one way training, evaluation, mining and
    the exported image processor all see it: RGB; `crop` resizes the shorter side to `size`
    (the longer one truncated, as Hugging Face's image processors do) and takes the centre
    square, `squash` resizes both sides; then [0, 1] and per-channel mean / std. Training may
    add a random resized crop and a horizontal flip, on the uint8 image, drawn from an `rng`
    the caller seeds (so a resumed run draws the same)."""
    size: int
    mean: tuple = tuple(MEAN.tolist())
    std: tuple = tuple(STD.tolist())
    resize: str = "crop"
    crop_scale: tuple = (1.0, 1.0)
    hflip: bool = False

    def uint8(self, img: Image.Image, rng: Optional[random.Random] = None, fast: bool = False) -> np.ndarray:
        """PIL image -> uint8 (3, S, S). `fast`: see `decode`."""
        img = img.convert("RGB")
        if rng is not None and self.crop_scale[0] < 1.0:
            img = img.crop(_random_crop_box(img.size, self.crop_scale, rng))
        s = self.size
        if self.resize == "squash":
            if img.size != (s, s):
                img = img.resize((s, s), Image.BICUBIC)
        else:
            w, h = img.size
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            left, top = (size[0] - s) // 2, (size[1] - s) // 2
            if fast and size != img.size:  # resample only the centre square
                sx, sy = w / size[0], h / size[1]
                img = img.resize((s, s), Image.BICUBIC, box=(left * sx, top * sy, (left + s) * sx, (top + s) * sy))
            else:
                if size != img.size:
                    img = img.resize(size, Image.BICUBIC)
                img = img.crop((left, top, left + s, top + s))
        if rng is not None and self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    @property
    def augments(self) -> bool:
        return self.crop_scale[0] < 1.0 or self.hflip

    @property
    def empty_shape(self) -> tuple:
        return (3, self.size, self.size)

    def decode(self, encoded: bytes, rng: Optional[random.Random] = None, fast: bool = False) -> np.ndarray:
        """Encoded image -> uint8 (3, S, S). `fast` (training) lets a JPEG much larger than S decode
        at a reduced scale (1/2, 1/4, 1/8, never below S) and resamples only the centre square:
        several times faster at small S, the same picture up to JPEG noise and a few border
        pixels. Evaluation, mining and export do it in full, as Hugging Face's processors do."""
        with Image.open(io.BytesIO(encoded)) as img:
            fast = fast and self.resize == "crop" and not self.augments
            if fast:
                img.draft("RGB", (self.size, self.size))
            return self.uint8(img, rng, fast)

    def normalize(self, pixels: "np.ndarray | torch.Tensor") -> torch.Tensor:
        """uint8 (..., 3, S, S) -> float32 tensor, scaled to [0, 1] and normalised per channel, on
        the device the pixels are on. Off the CPU each (channel, value) is looked up in the 3 x
        256 table that the CPU's arithmetic gives: the same bits as on the CPU (a GPU divides by a
        scalar as a multiplication by its reciprocal, which rounds differently)."""
        x = torch.as_tensor(pixels)
        if x.device.type != "cpu":
            return self.by_table(x)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        x = x.to(torch.float32, copy=True)  # the in-place ops below stay local
        return x.div_(255.0).sub_(mean).div_(std)  # float32 throughout: the same bits as every earlier run

    def by_table(self, pixels: torch.Tensor) -> torch.Tensor:
        """`normalize` as a lookup in the table of its CPU results, on the pixels' device."""
        table = _normalize_table(self.mean, self.std, str(pixels.device))
        offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=pixels.device)[:, None, None]
        return table[pixels.int() + offsets]

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        """PIL image -> normalised float tensor (3, S, S)."""
        return self.normalize(self.uint8(img, rng))


@dataclass(frozen=True)
class RegionFeatures:
    """Pre-extracted region features (`npy`: R x D floats) as the precomp tower's input: no
    resizing, no augmentation. Duck-types ImageTransform's decode / normalize."""
    dim: int
    augments = False

    @property
    def empty_shape(self) -> tuple:
        return (1, self.dim)

    def decode(self, encoded: bytes, rng: Optional[random.Random] = None, fast: bool = False) -> np.ndarray:
        features = np.load(io.BytesIO(encoded), allow_pickle=False)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"region features of shape {features.shape}, expected (regions, {self.dim})")
        return features

    def normalize(self, features: "np.ndarray | torch.Tensor") -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32)
                               if isinstance(features, np.ndarray) else features).to(torch.float32)


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple, std: tuple, device: str) -> torch.Tensor:
    """(3 * 256,) float32: `ImageTransform.normalize` of every uint8 value in every channel,
    computed on the CPU, held on `device`."""
    values = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[:, :, None]  # as a (3, 256, 1) image
    return ImageTransform(size=1, mean=mean, std=std).normalize(values).reshape(-1).to(device)


def _random_crop_box(size: tuple[int, int], scale: tuple, rng: random.Random) -> tuple[int, int, int, int]:
    """A box of a random share of the area (in `scale`) and aspect ratio in [3/4, 4/3]."""
    w, h = size
    for _ in range(10):
        area = w * h * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    return 0, 0, w, h


def as_transform(image):
    """A transform (ImageTransform or RegionFeatures); a bare size means an ImageTransform with
    the defaults (CLIP statistics, centre crop)."""
    return ImageTransform(int(image)) if isinstance(image, int) else image


def image_transform(cfg, train: bool = False) -> "ImageTransform | RegionFeatures":
    """The run's transform, from its resolved config (see `resolve_image_config`); `train` adds
    the augmentation. A precomp tower reads region features instead."""
    if cfg.model.vision.kind == "precomp":
        return RegionFeatures(cfg.model.vision.feature_dim)
    image_cfg = cfg.data.image
    mean, std = image_cfg.mean or tuple(MEAN.tolist()), image_cfg.std or tuple(STD.tolist())
    resize = image_cfg.resize or "crop"
    if train:
        return ImageTransform(cfg.model.vision.image_size, tuple(mean), tuple(std), resize, tuple(image_cfg.crop_scale),
                              image_cfg.hflip)
    return ImageTransform(cfg.model.vision.image_size, tuple(mean), tuple(std), resize)


def resolve_image_config(cfg):
    """The config with its unset `data.image` values filled from the vision checkpoint's image
    processor (`preprocessor_config.json`), else CLIP's statistics and a centre crop, so that the
    run's saved config records what it used (a new Config; the one given is not changed). A
    processor whose crop size is not model.vision.image_size is an error naming both."""
    image_cfg, vision = cfg.data.image, cfg.model.vision
    if vision.kind == "precomp":
        return cfg
    proc = {}
    if vision.pretrained:
        path = Path(local_folder(vision.pretrained, "model.vision.pretrained")) / "preprocessor_config.json"
        if path.exists():
            proc = json.loads(path.read_text())
    crop = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    side = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    if side is not None and int(side) != vision.image_size:
        raise DataError(f"config key 'model.vision.image_size': {vision.image_size}, but the image processor of "
                        f"{vision.pretrained} makes {side} px inputs; set model.vision.image_size={side}")
    mean = tuple(float(x) for x in proc.get("image_mean", MEAN.tolist()))
    std = tuple(float(x) for x in proc.get("image_std", STD.tolist()))
    resize = "squash" if proc and not proc.get("do_center_crop", False) else "crop"
    filled = dataclasses.replace(image_cfg, mean=image_cfg.mean if image_cfg.mean is not None else mean,
                                 std=image_cfg.std if image_cfg.std is not None else std,
                                 resize=image_cfg.resize or resize)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image=filled))


def preprocessor_config(transform: ImageTransform) -> dict:
    """The transform as a CLIPImageProcessor's settings (`export` writes them as
    preprocessor_config.json), so AutoImageProcessor feeds the exported tower what the run did."""
    s, crop = transform.size, transform.resize == "crop"
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": s} if crop else {"height": s, "width": s}, "resample": 3,
            "do_center_crop": crop, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(transform.mean),
            "image_std": list(transform.std)}


class Tokenize:
    """Captions -> padded token tensors, as every path of the project encodes text: training
    batches, evaluation, mining and AOQ's offline negatives."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str]) -> dict:
        enc = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------- decoding on the GPU

def gpu_decodable(encoded: bytes) -> bool:
    """An image the GPU's JPEG decoder takes as it is: a baseline or progressive JPEG in RGB or
    grey whose header reads and whose data ends with the end-of-image marker (a truncated file
    does not). Anything else is decoded by the CPU path, where a bad one is skipped and counted."""
    if not encoded.startswith(b"\xff\xd8") or not encoded.rstrip(b"\0")[-2:] == b"\xff\xd9":
        return False
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L")
    except Exception:  # noqa: BLE001 - PIL raises many types on a bad header
        return False


def check_gpu_decode(device: Optional[torch.device]) -> None:
    """`data.decode=gpu` needs a CUDA device and torchvision's JPEG decoder: a ConfigError
    naming the key otherwise."""
    if device is None or torch.device(device).type != "cuda":
        raise ConfigError("config key 'data.decode': 'gpu' needs a CUDA device, and this rank has none; "
                          "set data.decode=cpu")
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        raise ConfigError(f"config key 'data.decode': 'gpu' needs torchvision (its decode_jpeg), which does not "
                          f"import here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "install the torchvision built for this torch, or set data.decode=cpu") from None


def decode_on_device(images: list[torch.Tensor], transform: ImageTransform, device: torch.device,
                     chunk: int = 128) -> tuple[torch.Tensor, list[int]]:
    """A batch as the loader ships it under `data.decode=gpu` (per sample a JPEG's bytes, 1-D
    uint8, or an image the CPU decoded already, uint8 (3, S, S)) -> uint8 (B, 3, S, S) on
    `device`, the JPEGs decoded there by torchvision's decode_jpeg (nvJPEG) `chunk` at a time
    (the full-size images of a chunk are all the memory it takes beside the output) and resized
    as `resize_on_device` does; and the positions no decoder could read (their pixels are
    zeros). A JPEG the batched decode refuses is retried alone, then decoded on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    s = transform.size
    out = torch.zeros(len(images), 3, s, s, dtype=torch.uint8, device=device)
    for i, x in enumerate(images):
        if x.dim() == 3:
            out[i] = x.to(device, non_blocking=True)
    encoded, bad = [i for i, x in enumerate(images) if x.dim() == 1], []
    for first in range(0, len(encoded), chunk):
        part = encoded[first:first + chunk]
        try:
            decoded = dict(zip(part, decode_jpeg([images[i] for i in part], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # one bad JPEG fails the whole call
            decoded = {}
            for i in part:
                try:
                    decoded[i] = decode_jpeg(images[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
        for i in part:
            if i not in decoded:
                try:
                    out[i] = torch.from_numpy(transform.decode(images[i].numpy().tobytes(), fast=True)).to(device)
                except Exception:  # noqa: BLE001 - as the CPU path: a corrupt image is counted, never fatal
                    bad.append(i)
        for idx, resized in resize_on_device(decoded, transform).items():
            out[list(idx)] = resized
        del decoded
    return out, bad


def resize_on_device(images: dict[int, torch.Tensor], transform: ImageTransform) -> dict[tuple, torch.Tensor]:
    """Decoded uint8 (3, H, W) images, by position -> uint8 (n, 3, S, S) per group of positions
    that share a size, on the images' device: `crop` takes the centre square of the shorter side
    (to a whole pixel) and resizes it, `squash` resizes the whole image; bicubic with
    antialiasing, as PIL resamples (the same picture up to rounding and a sub-pixel shift)."""
    s = transform.size
    groups: dict[tuple, list[int]] = {}
    for i, img in images.items():
        groups.setdefault(tuple(img.shape[1:]), []).append(i)
    out = {}
    for (h, w), idx in groups.items():
        x = torch.stack([images[i] for i in idx])
        if transform.resize != "squash":
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            x = x[:, :, top:top + side, left:left + side]
        if x.shape[-2:] != (s, s):
            x = torch.nn.functional.interpolate(x.float(), size=(s, s), mode="bicubic", antialias=True,
                                                align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
        out[tuple(idx)] = x
    return out
