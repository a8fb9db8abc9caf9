"""Host-side (NumPy / PIL, not JAX) image preprocessing for the frozen image encoders, matching transformers'
PIL image processors value for value.

  clip_preprocess     CLIPImageProcessor() with its defaults: RGB, resize the shortest side to 224 (PIL
                      bicubic), center-crop 224x224, x 1/255, OpenAI CLIP mean / std. Used by PCDMs for the CLIP
                      ViT-H/14 input *and* for its DINOv2-giant input (PCDMs never uses DINOv2's own statistics),
                      by FPDM's stage-1 CLIP inputs (squashed to 224x224 first, so the crop is a no-op), and by
                      CFLD's CLIP ablation.
  dinov2_preprocess   BitImageProcessor as configured for facebook/dinov2-* (shortest side 256, PIL bicubic,
                      center-crop 224x224, x 1/255, ImageNet mean / std). FPDM feeds DINOv2 a 512x512 source with
                      size=512, crop=None (no resize, no crop, ImageNet statistics).
  normalize_pixels    the last two steps (x 1/255 in float64 then float32, (x - mean) / std) on uint8 arrays of
                      any leading shape, e.g. a batch already resized by the input pipeline.

All return float32 channels-last (HWC) arrays, the layout our NHWC encoders take. The PIL backend is the
reference: transformers >= 5 makes its torchvision backend the default where torchvision is installed, and that
backend's bicubic resize differs from PIL's by a few grey levels; the original PCDMs / FPDM code ran the PIL
processors of transformers 4.x, which these functions reproduce.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, np.ndarray]


def to_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode (transparency composited onto white, as transformers'
    `convert_to_rgb` does) or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (RGBA)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 pixels in [0, 255], got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last), got "
                             f"shape {image.shape}")
        if min(image.shape[:2]) == 0:
            raise ValueError(f"image array is empty: shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, size: int) -> tuple:
    """(new_height, new_width) with the shorter side `size` and the longer one int(size * long / short)
    (truncated), as transformers' get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(pixels: np.ndarray, crop: int) -> np.ndarray:
    """transformers' center_crop on HWC: offset (H - crop) // 2; an image smaller than the crop is zero-padded
    (the pad placed ceil((crop - H) / 2) before)."""
    height, width = pixels.shape[:2]
    if height < crop or width < crop:
        new_h, new_w = max(height, crop), max(width, crop)
        padded = np.zeros((new_h, new_w) + pixels.shape[2:], pixels.dtype)
        top, left = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
        padded[top:top + height, left:left + width] = pixels
        pixels, height, width = padded, new_h, new_w
    top, left = (height - crop) // 2, (width - crop) // 2
    return pixels[top:top + crop, left:left + crop]


def normalize_pixels(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(images / 255 - mean) / std over the last (channel) axis, float32, with transformers' rounding: the
    rescale in float64 then cast to float32, mean and std as float32. images_uint8: uint8 [..., C]."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"normalize_pixels expects uint8 pixels, got dtype {images.dtype}")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if images.ndim == 0 or mean.shape != (images.shape[-1],) or std.shape != (images.shape[-1],):
        raise ValueError(f"normalize_pixels: mean {mean.shape} and std {std.shape} need one value per channel of "
                         f"images with shape {images.shape} (channels last)")
    scaled = (images.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - mean) / std


def resize_crop_normalize(image: ImageLike, size: Optional[int], crop: Optional[int], mean: Sequence[float],
                          std: Sequence[float]) -> np.ndarray:
    """The pipeline of transformers' PIL image processors with a `shortest_edge` size: RGB conversion, resize
    of the shortest side to `size` with PIL bicubic (None: no resize), center crop to crop x crop (None: no crop),
    then normalize_pixels. Returns float32 [H, W, 3]."""
    image = to_rgb(image)
    if size is not None:
        if int(size) <= 0:
            raise ValueError(f"resize size must be positive, got {size}")
        height, width = shortest_edge_size(image.height, image.width, int(size))
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    if crop is not None:
        if int(crop) <= 0:
            raise ValueError(f"crop size must be positive, got {crop}")
        pixels = _center_crop(pixels, int(crop))
    return normalize_pixels(pixels, mean, std)


def clip_preprocess(image: ImageLike, size: Optional[int] = 224, crop: Optional[int] = 224,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """float32 [crop, crop, 3] pixels for the CLIP vision tower; equal to transformers'
    `CLIPImageProcessor()(images=image)["pixel_values"][0]` transposed to HWC (PIL backend, defaults: RGB
    conversion, shortest side -> 224 with PIL bicubic, center crop 224, x 1/255, OpenAI CLIP mean / std).

    PCDMs uses exactly these defaults for its CLIP (ViT-H/14) and its DINOv2 inputs; FPDM uses them with
    crop=None after squashing images to 224x224. image: PIL image (any mode) or uint8 array [H, W(, C)].
    """
    return resize_crop_normalize(image, size, crop, mean, std)


def dinov2_preprocess(image: ImageLike, size: Optional[int] = 256, crop: Optional[int] = 224,
                      mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                      std: Sequence[float] = IMAGENET_DEFAULT_STD) -> np.ndarray:
    """float32 [crop, crop, 3] pixels for DINOv2; equal to transformers' `BitImageProcessor` as configured by
    facebook/dinov2-*'s preprocessor_config.json (PIL backend: RGB conversion, shortest side -> 256 with PIL
    bicubic, center crop 224, x 1/255, ImageNet mean / std), transposed to HWC.

    FPDM uses size=512, crop=None on a 512x512 source. PCDMs does *not* use this: it feeds DINOv2 the
    clip_preprocess output (CLIP statistics, 224x224).
    """
    return resize_crop_normalize(image, size, crop, mean, std)


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "to_rgb",
           "shortest_edge_size", "normalize_pixels", "resize_crop_normalize", "clip_preprocess",
           "dinov2_preprocess"]
