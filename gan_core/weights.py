"""Locate pretrained backbone weights on disk, never downloading them.

Training machines are often offline, and `torchvision.models.vgg19(weights=...)`
or `lpips.LPIPS(net="alex")` would try to fetch their ImageNet backbones from
the internet at construction time. Every backbone file goes through
`find_weights` instead, which only looks on disk and, when the file is absent,
says exactly where it looked and how to provide it.

Search order for `find_weights(filename, explicit_path)`:
  1. `explicit_path`: a file (used as is), or a directory containing `filename`;
  2. `$GAN_CORE_WEIGHTS_DIR/filename`;
  3. `torch.hub.get_dir()/checkpoints/filename` (torchvision's own cache, so a
     file fetched once with `torch.hub.load_state_dict_from_url` is found).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHTS_DIR_ENV = "GAN_CORE_WEIGHTS_DIR"

_TORCHVISION_URL = "https://download.pytorch.org/models/"

# torchvision's ImageNet backbones used by the perceptual losses; the names are
# the ones torchvision itself caches them under, so an existing hub cache works.
KNOWN_WEIGHTS = {
    "alexnet-owt-7be5be79.pth": _TORCHVISION_URL + "alexnet-owt-7be5be79.pth",
    "vgg16-397923af.pth": _TORCHVISION_URL + "vgg16-397923af.pth",
    "vgg19-dcbbabf1.pth": _TORCHVISION_URL + "vgg19-dcbbabf1.pth",
}


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file was not found in any of the searched places."""


def hub_checkpoint_dir() -> Path:
    """Return torch hub's checkpoint cache, `torch.hub.get_dir()/checkpoints`.

    Returns:
        The directory (it may not exist). It follows `$TORCH_HOME` and
        `torch.hub.set_dir`.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_search_paths(filename: str, explicit_path: str | os.PathLike | None = None) -> list[Path]:
    """List the candidate paths for `filename`, in search order.

    Args:
        filename: Base name of the weights file, e.g. "vgg19-dcbbabf1.pth".
        explicit_path: Optional file or directory given by the caller.

    Returns:
        Candidate file paths; an explicit path that is not a directory is
        listed as is (it is used even if its name differs from `filename`).
    """
    candidates: list[Path] = []
    if explicit_path is not None:
        explicit = Path(explicit_path).expanduser()
        candidates.append(explicit / filename if explicit.is_dir() else explicit)
    env_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if env_dir:
        candidates.append(Path(env_dir).expanduser() / filename)
    candidates.append(hub_checkpoint_dir() / filename)
    return candidates


def missing_weights_message(filename: str, searched: list[Path]) -> str:
    """Build the explanation raised when `filename` is not found.

    Args:
        filename: Base name of the weights file.
        searched: Every path that was looked at.

    Returns:
        A message naming the file, the places searched, where to download it
        on a connected machine, and the three ways to provide it.
    """
    url = KNOWN_WEIGHTS.get(filename)
    hub_dir = hub_checkpoint_dir()
    lines = [f"Pretrained weights file {filename!r} not found (nothing is downloaded at run time).", "Looked in:"]
    lines += [f"  - {path}" for path in searched]
    if url is None:
        lines.append("No known download URL for this file.")
    else:
        lines.append(f"Download it on a connected machine: curl -L -o {filename} {url}")
    lines += [
        "Then provide it in one of these ways:",
        (
            "  - give its path (the file, or its directory) as the `loss.perceptual_weights_path` config key "
            "(the `weights_path` argument of LPIPS / VGGFeatureLoss);"
        ),
        f"  - put it in a directory and set ${WEIGHTS_DIR_ENV} to that directory;",
        f"  - copy it into the torch hub cache {hub_dir} (set $TORCH_HOME to move the cache).",
    ]
    return "\n".join(lines)


def find_weights(filename: str, explicit_path: str | os.PathLike | None = None) -> Path:
    """Find a pretrained weights file on disk without downloading anything.

    Args:
        filename: Base name of the weights file, e.g. "alexnet-owt-7be5be79.pth"
            (see `KNOWN_WEIGHTS`).
        explicit_path: Optional file, or directory containing `filename`,
            searched first. If it does not hold the file the search goes on
            (the error then lists it among the places looked).

    Returns:
        Path of the first existing candidate file.

    Raises:
        MissingWeightsError: No candidate exists; the message names the file,
            every place looked, the download URL and how to provide the file.
    """
    searched = weights_search_paths(filename, explicit_path)
    for path in searched:
        if path.is_file():
            return path
    raise MissingWeightsError(missing_weights_message(filename, searched))
