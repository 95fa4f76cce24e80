"""An offline demo data set: natural colour photos that installed packages ship.

scikit-image installs a few images in its `data/` folder (`skimage.data.data_dir`);
most of its gallery is fetched on demand with pooch and is absent offline, so
only shipped files are used and nothing is ever downloaded. From those, the
natural colour photos at least 300 px on their shorter side (enough for 128 px
patches) are used; synthetic images (color, chessboard, phantom, logo, horse)
and grayscale ones are not. scikit-learn and matplotlib (both required by
mlflow) ship three more natural photos, which join the training side.

Split, fixed by file name:
- validation (DEMO_VAL): astronaut.png (512x512), chelsea.png (451x300),
  coffee.png (600x400);
- training (DEMO_TRAIN): hubble_deep_field.jpg, ihc.png, motorcycle_left.png,
  motorcycle_right.png, retina.jpg, rocket.jpg. The two motorcycle views are a
  stereo pair, so both stay on the same side of the split. Then
  (DEMO_TRAIN_EXTRA) scikit-learn's china.jpg and flower.jpg (640x427) and
  matplotlib's grace_hopper.jpg (512x600): everyday scenes like the validation
  photos, where the six above are mostly scientific imagery. With them the
  15-minute recipe gained about 0.1 dB on the validation photos (measured).

Paired demo sets for the other tasks (`prepare_task_demo`) are made from the same
photos and the same split, seeded by file name, so every run writes the same bytes.
They are synthetic: good enough to check that a recipe trains and to compare runs,
not a benchmark.
- denoise: noisy/ = the photo plus Gaussian colour noise, sigma drawn per image in
  [5, 50] (on 0..255); clean/ = the photo.
- lowlight: low/ = the photo darkened as in Lv et al., "Attention guided low-light
  image enhancement with a large scale low-light simulation dataset" (IJCV 2021):
  x -> scale * x ** gamma, gamma in [2, 3.5], scale in [0.2, 0.6], then Poisson
  (shot) noise and Gaussian (read) noise; high/ = the photo.
- fusion: NOT real infrared. vi/ = the photo with one soft elliptical region made
  dark or hazy (what a visible camera misses at night or in fog); ir/ = a gray
  "thermal-like" image of the whole scene: luminance with another channel
  weighting, blurred a little, remapped by a smooth S-curve, with a few warm
  blobs ("targets", some inside the degraded region) that the visible image does
  not show. A good fusion takes the intensities from ir/ and the detail from vi/.
"""

from __future__ import annotations

import importlib.util
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from gan_core.data.images import encode_png, load_image
from gan_core.data.paired import PAIR_LAYOUTS
from gan_core.files import atomic_write

DEMO_VAL = ("astronaut.png", "chelsea.png", "coffee.png")
DEMO_TRAIN = (
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
# (package, file inside the installed package): used when the package is installed.
DEMO_TRAIN_EXTRA = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)


def skimage_data_dir() -> Path:
    """scikit-image's installed data folder."""
    import skimage.data  # imported here: scikit-image is only needed for the demo

    return Path(skimage.data.data_dir)


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    folders = spec.submodule_search_locations if spec is not None else None
    paths = [Path(folder) / relative for folder in folders or []]
    return next((path for path in paths if path.is_file()), None)


def demo_images() -> dict[str, list[Path]]:
    """The demo photos present in this installation.

    Returns:
        {"train": [...], "val": [...]}: existing files only, in DEMO_TRAIN +
        DEMO_TRAIN_EXTRA / DEMO_VAL order (a release that lacks a file just has fewer).

    Raises:
        FileNotFoundError: no training or no validation photo is installed.
    """
    data_dir = skimage_data_dir()
    split = {
        "train": [data_dir / name for name in DEMO_TRAIN if (data_dir / name).is_file()]
        + [path for path in (package_file(*entry) for entry in DEMO_TRAIN_EXTRA) if path is not None],
        "val": [data_dir / name for name in DEMO_VAL if (data_dir / name).is_file()],
    }
    for part, paths in split.items():
        if not paths:
            raise FileNotFoundError(f"no demo {part} photo found in scikit-image's data folder {data_dir}")
    return split


def prepare_demo_folders(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the demo photos as PNG into out_dir/train and out_dir/val.

    Idempotent: files already present are kept, new ones are written atomically
    (`gan_core.files.atomic_write`), so a second call costs almost nothing.

    Args:
        out_dir: destination folder, created if missing.

    Returns:
        (train_dir, val_dir).

    Raises:
        FileNotFoundError: see demo_images.
    """
    out_dir = Path(out_dir)
    folders = {}
    for part, paths in demo_images().items():
        folder = out_dir / part
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            target = folder / f"{path.stem}.png"
            if not target.is_file():
                png = encode_png(load_image(path))
                atomic_write(target, lambda handle: handle.write(png))
        folders[part] = folder
    return folders["train"], folders["val"]


def prepare_task_demo(root: str | Path, task: str) -> tuple[Path, Path]:
    """Write a task's demo set from the demo photos (see the module docstring for how pairs are made).

    sr: the photos themselves, as prepare_demo_folders(root). denoise, lowlight, fusion: paired folders
    in the task's PAIR_LAYOUTS layout, from the photos of root/train and root/val (written first):

        root/denoise/train/noisy/*.png  root/denoise/train/clean/*.png   (and root/denoise/val/...)
        root/lowlight/{train,val}/{low,high}/*.png
        root/fusion/{train,val}/{ir,vi}/*.png                            (ir/ as 8-bit gray PNG)

    Deterministic (seeded by task and file name); files whose bytes would not change are not rewritten.

    Args:
        root: the demo folder (data/demo).
        task: sr, denoise, lowlight or fusion.

    Returns:
        (train_dir, val_dir): root/train, root/val for sr, else root/<task>/train and root/<task>/val.

    Raises:
        ValueError: unknown task.
        FileNotFoundError: see demo_images.
    """
    if task != "sr" and task not in PAIR_LAYOUTS:
        raise ValueError(f"unknown task {task!r}; valid: sr, {', '.join(PAIR_LAYOUTS)}")
    photo_dirs = prepare_demo_folders(root)
    if task == "sr":
        return photo_dirs
    input_name, target_name = PAIR_LAYOUTS[task]
    task_seed = list(PAIR_LAYOUTS).index(task) + 1
    out = []
    for photo_dir in photo_dirs:
        part_dir = Path(root) / task / photo_dir.name
        for photo in sorted(photo_dir.glob("*.png")):
            img = load_image(photo)  # (H, W, 3) uint8
            rng = np.random.default_rng([task_seed, zlib.crc32(photo.name.encode())])
            if task == "denoise":  # the target is the photo: its PNG as written by prepare_demo_folders
                input_png, target_png = encode_png(synthetic_noisy(img, rng)), photo.read_bytes()
            elif task == "lowlight":
                input_png, target_png = encode_png(synthetic_low_light(img, rng)), photo.read_bytes()
            else:
                infrared, visible = synthetic_infrared_visible(img, rng)
                input_png, target_png = _gray_png(infrared), encode_png(visible)
            _write_if_changed(part_dir / input_name / photo.name, input_png)
            _write_if_changed(part_dir / target_name / photo.name, target_png)
        out.append(part_dir)
    return out[0], out[1]


def synthetic_noisy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """img (H, W, 3) uint8 plus Gaussian colour noise (one draw per channel), sigma in [5, 50] of 255."""
    sigma = rng.uniform(5, 50)
    noisy = img + np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def synthetic_low_light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """img (H, W, 3) uint8 darkened as Lv et al. (2021): scale * x ** gamma, then shot and read noise.

    gamma in [2, 3.5], scale in [0.2, 0.6]; Poisson noise of a sensor that counts 200..2000 photons at
    full scale (log-uniform), Gaussian read noise of sigma 1..4 / 255.
    """
    x = img.astype(np.float32) / 255
    low = np.float32(rng.uniform(0.2, 0.6)) * x ** np.float32(rng.uniform(2.0, 3.5))
    photons = np.exp(rng.uniform(np.log(200), np.log(2000)))
    read_noise = np.float32(rng.uniform(1, 4) / 255) * rng.standard_normal(img.shape, dtype=np.float32)
    low = rng.poisson(low * photons) / photons + read_noise
    return np.clip(np.round(low * 255), 0, 255).astype(np.uint8)


def synthetic_infrared_visible(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (infrared (H, W) uint8, visible (H, W, 3) uint8) pair from one photo: see the module docstring.

    Not real infrared: the "thermal" image is a remapped luminance of the photo plus warm blobs.
    """
    x = img.astype(np.float32) / 255
    height, width = x.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Visible: one soft elliptical region that the camera barely sees (night shadow or fog).
    centre = rng.uniform(0.3, 0.7, 2) * (height, width)
    radii = rng.uniform(0.2, 0.35, 2) * (height, width)
    distance = np.sqrt(((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2)
    region = 1 / (1 + np.exp((distance - 1) * 8))[..., None]  # (H, W, 1): 1 inside, 0 outside
    if rng.random() < 0.5:
        missed = x * rng.uniform(0.08, 0.2)  # dark
    else:
        contrast = rng.uniform(0.15, 0.3)
        missed = x * contrast + (1 - contrast) * rng.uniform(0.7, 0.85)  # haze
    visible = x * (1 - region) + missed * region
    # Infrared: the whole scene, another channel weighting than luma, blurred, smooth S-curve remap.
    thermal = gaussian_filter(x @ np.float32([0.55, 0.35, 0.10]), sigma=1.5)
    curve = 1 / (1 + np.exp(-(thermal - 0.5) * 5))
    low, high = 1 / (1 + np.exp(2.5)), 1 / (1 + np.exp(-2.5))
    thermal = 0.1 + 0.6 * (curve - low) / (high - low)
    # Warm targets, upright like people; the first ones inside the degraded region.
    count = int(rng.integers(2, 5))
    for index in range(count):
        y, x_centre = (centre + rng.uniform(-0.6, 0.6, 2) * radii if index < (count + 1) // 2
                       else rng.uniform(0.1, 0.9, 2) * (height, width))
        size = rng.uniform(0.02, 0.045) * min(height, width)
        blob = np.exp(-(((yy - y) / (2 * size)) ** 2 + ((xx - x_centre) / size) ** 2) / 2)
        thermal = thermal + (0.97 - thermal) * rng.uniform(0.75, 0.95) * blob
    thermal = thermal + rng.normal(0.0, 1.5 / 255, thermal.shape)
    to_uint8 = lambda values: np.clip(np.round(values * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to_uint8(thermal), to_uint8(visible)


def _gray_png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        atomic_write(path, lambda handle: handle.write(data))
