"""Data for super-resolution training: decoding, Parquet shards, degradations, patch pairs, demo set."""

from gan_core.data.degradations import (
    DEGRADATION_KEYS,
    add_gaussian_noise,
    add_poisson_noise,
    bicubic_downscale,
    degrade,
    gaussian_blur,
    imresize,
    jpeg_compress,
)
from gan_core.data.demo import DEMO_TRAIN, DEMO_VAL, demo_images, prepare_demo_folders
from gan_core.data.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, encode_png, load_image
from gan_core.data.pairs import (
    PatchSampler,
    bicubic_upscale,
    random_gt_patch,
    random_patch_pair,
    to_chw_uint8,
    validation_pair,
)
from gan_core.data.shards import (
    SHARD_SCHEMA,
    ShardReport,
    find_image_files,
    load_shard_images,
    read_shards,
    shard_files,
    subimage_starts,
    write_shards,
)

__all__ = [
    "DEGRADATION_KEYS",
    "DEMO_TRAIN",
    "DEMO_VAL",
    "IMAGE_EXTENSIONS",
    "SHARD_SCHEMA",
    "ImageDecodeError",
    "PatchSampler",
    "ShardReport",
    "add_gaussian_noise",
    "add_poisson_noise",
    "bicubic_downscale",
    "bicubic_upscale",
    "decode_image",
    "degrade",
    "demo_images",
    "encode_png",
    "find_image_files",
    "gaussian_blur",
    "imresize",
    "jpeg_compress",
    "load_image",
    "load_shard_images",
    "prepare_demo_folders",
    "random_gt_patch",
    "random_patch_pair",
    "read_shards",
    "shard_files",
    "subimage_starts",
    "to_chw_uint8",
    "validation_pair",
    "write_shards",
]
