"""Host-side image preprocessing against transformers' PIL image processors: CLIPImageProcessor with its
defaults (PCDMs), BitImageProcessor as configured for facebook/dinov2-*, and FPDM's no-crop variants."""

import numpy as np
import pytest
import transformers
from PIL import Image

from pgpis_jax import preprocessing
from pgpis_jax.preprocessing import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                     clip_preprocess, dinov2_preprocess, normalize_pixels)

TOLERANCE = 1e-5
# (height, width): DeepFashion's portrait 176x256 and 352x512, odd sizes, landscape, an exact 224 short side,
# and images smaller than the crop (upsampled)
SIZES = [(256, 176), (512, 352), (131, 97), (225, 301), (224, 380), (150, 150), (60, 100)]
# facebook/dinov2-{small,base,large,giant} preprocessor_config.json
DINOV2 = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
              do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True, resample=3,
              rescale_factor=1 / 255, image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))


def _image(height, width, seed=0, channels=3):
    """Smooth colour gradients plus noise: both the interpolation and the exact pixel values matter."""
    rng = np.random.default_rng(seed + height * 1000 + width)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 127 + 100 * np.sin(x / 7 + y / 11)],
                    -1)[..., :channels]
    noisy = base + rng.normal(0, 40, base.shape) if channels == 3 else rng.uniform(0, 255, (height, width, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _reference(processor, image):
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _check(actual, expected, label):
    assert actual.dtype == np.float32, label
    assert actual.shape == expected.shape, f"{label}: {actual.shape} != {expected.shape}"
    error = float(np.abs(actual - expected).max())
    print(f"{label}: max abs error {error:.1e}")
    assert error <= TOLERANCE, f"{label}: max abs error {error}"


@pytest.mark.parametrize("height,width", SIZES)
def test_clip_preprocess_matches_clip_image_processor_defaults(height, width):
    processor = transformers.CLIPImageProcessorPil()
    array = _image(height, width)
    expected = _reference(processor, Image.fromarray(array))
    assert expected.shape == (224, 224, 3)
    _check(clip_preprocess(Image.fromarray(array)), expected, f"clip {height}x{width} PIL")
    _check(clip_preprocess(array), expected, f"clip {height}x{width} uint8 array")


def test_clip_image_processor_here_is_the_pil_backend():
    """Without torchvision, transformers' CLIPImageProcessor() is the PIL backend that clip_preprocess
    reproduces (with torchvision it would be the torchvision backend, whose bicubic differs slightly)."""
    processor = transformers.CLIPImageProcessor()
    if getattr(processor, "backend", "pil") != "pil":
        pytest.skip(f"CLIPImageProcessor() uses the {processor.backend} backend here")
    array = _image(256, 176, seed=1)
    _check(clip_preprocess(array), _reference(processor, Image.fromarray(array)), "CLIPImageProcessor()")


@pytest.mark.parametrize("height,width", [(256, 176), (512, 352), (257, 255), (300, 200), (100, 90)])
def test_dinov2_preprocess_matches_dinov2_bit_image_processor(height, width):
    processor = transformers.BitImageProcessorPil(**DINOV2)
    array = _image(height, width, seed=2)
    _check(dinov2_preprocess(Image.fromarray(array)), _reference(processor, Image.fromarray(array)),
           f"dinov2 {height}x{width}")


def test_fpdm_variants_without_center_crop():
    """FPDM: DINOv2 on a 512x512 source with shortest_edge 512 and no crop; CLIP on a 224x224 squash, no crop."""
    source = _image(512, 512, seed=3)
    bit = transformers.BitImageProcessorPil(**{**DINOV2, "size": {"shortest_edge": 512}, "do_center_crop": False})
    _check(dinov2_preprocess(source, size=512, crop=None), _reference(bit, Image.fromarray(source)), "fpdm dinov2")
    squashed = Image.fromarray(_image(1101, 750, seed=4)).resize((224, 224), Image.Resampling.BICUBIC)
    clip = transformers.CLIPImageProcessorPil(do_center_crop=False)
    _check(clip_preprocess(squashed, crop=None), _reference(clip, squashed), "fpdm clip")
    # and an unsquashed portrait keeps its aspect ratio without the crop
    portrait = _image(328, 224, seed=5)
    _check(clip_preprocess(portrait, crop=None), _reference(clip, Image.fromarray(portrait)), "clip no crop")


def test_crop_larger_than_the_resized_image_is_zero_padded_like_transformers():
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 200})
    array = _image(181, 233, seed=6)
    actual = clip_preprocess(array, size=200)
    _check(actual, _reference(processor, Image.fromarray(array)), "padded crop")
    assert np.allclose(actual[:12, :, 0], -OPENAI_CLIP_MEAN[0] / OPENAI_CLIP_STD[0])  # the 24-row pad, split 12/12


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_other_pil_modes_convert_like_transformers(mode):
    """Greyscale is replicated; transparency (RGBA, LA, a palette with a transparent index) is composited onto
    white, as transformers' convert_to_rgb does."""
    rgba = Image.fromarray(_image(200, 170, seed=7, channels=4), "RGBA")
    if mode == "P":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3
    else:
        image = rgba.convert(mode)
    processor = transformers.CLIPImageProcessorPil()
    _check(clip_preprocess(image), _reference(processor, image), f"mode {mode}")


def test_array_layouts_agree_with_pil_inputs():
    rgba = _image(90, 120, seed=8, channels=4)
    np.testing.assert_array_equal(clip_preprocess(rgba), clip_preprocess(Image.fromarray(rgba, "RGBA")))
    grey = _image(90, 120, seed=9)[..., 0]
    np.testing.assert_array_equal(clip_preprocess(grey), clip_preprocess(Image.fromarray(grey, "L")))
    np.testing.assert_array_equal(clip_preprocess(grey[..., None]), clip_preprocess(grey))


def test_normalize_pixels_matches_rescale_and_normalize():
    batch = np.stack([_image(224, 224, seed=s) for s in range(2)])
    processor = transformers.CLIPImageProcessorPil(do_resize=False, do_center_crop=False)
    expected = processor(images=list(batch), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    actual = normalize_pixels(batch, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    _check(actual, expected, "normalize_pixels")
    np.testing.assert_array_equal(actual[1], clip_preprocess(batch[1]))


@pytest.mark.parametrize("image,message", [
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64, 2), np.uint8), "shape"),
    (np.zeros((2, 64, 64, 3), np.uint8), "shape"),
    (np.zeros((0, 64, 3), np.uint8), "empty"),
    ("image.png", "PIL.Image.Image or a uint8 numpy array"),
])
def test_bad_images_raise(image, message):
    with pytest.raises(ValueError, match=message):
        clip_preprocess(image)


def test_bad_normalisation_arguments_raise():
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(np.zeros((4, 4, 3), np.float32), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize_pixels(np.zeros((4, 4, 3), np.uint8), (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="crop size must be positive"):
        clip_preprocess(np.zeros((8, 8, 3), np.uint8), crop=0)


def test_module_documents_which_method_uses_which():
    doc = preprocessing.__doc__ + clip_preprocess.__doc__ + dinov2_preprocess.__doc__
    assert "PCDMs" in doc and "FPDM" in doc and "DINOv2" in clip_preprocess.__doc__
