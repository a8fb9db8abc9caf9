"""Evaluation protocols: how each paper's released script turns image files into FID, LPIPS, SSIM and PSNR.

One frozen `Protocol` per preset (read from the scripts; /work/shared/reference/metrics.md sections 1 and 5).
Sizes are height x width; "gen" = generated images, "ref" = reference (ground truth) and FID real images.

| field                  | `standard` (no --protocol) | `pcdms`                     | `cfld` (= NTED)                       | `fpdm`                       | `pidm` (= RePoseDM)                       |
|------------------------|----------------------------|-----------------------------|---------------------------------------|------------------------------|-------------------------------------------|
| eval size              | the files' own             | 256x176 (or 512x352)        | 256x176 (or 512x352)                  | 512x352 (or 256x176)         | FID/LPIPS 256x176; SSIM/PSNR the files' own (256x256) |
| gen -> eval size       | none                       | cv2 cubic a=-0.75, float    | torch AA bicubic, clip, floor to uint8 | PIL bicubic (rounded uint8) | cv2 bilinear, float (FID/LPIPS)           |
| ref -> eval size       | none                       | cv2 cubic a=-0.75, float    | PIL bicubic (rounded uint8)           | PIL bicubic                  | cv2 bilinear (FID/LPIPS)                  |
| pairing                | same name                  | `<src>_to_<tgt>` -> `<tgt>` | same name                             | FPDM names (`fpdm_key`)      | `<src>_to_<tgt>` -> `<tgt>`               |
| FID network / input    | pt_inception / 2x-1        | torchvision / legacy quirk  | torchvision / legacy quirk            | torchvision / legacy quirk   | torchvision / legacy quirk                |
| FID real set           | --real_dir, else the ref folder | --real_dir (all train)  | --real_dir (all train)                | the matched test targets     | --real_dir (all train)                    |
| FID whole batches of   | - (all)                    | 128                         | - (all)                               | - (all)                      | 64                                        |
| LPIPS net / input      | alex / 2x-1                | alex / [0,1] unmapped       | alex / 2x-1                           | alex / 2x-1                  | alex / 2x-1                               |
| LPIPS whole batches of | - (all)                    | 64                          | - (all)                               | 10                           | 64                                        |
| SSIM (reported)        | Gaussian 1.5, pop. cov., R=255 on uint8 | Gaussian 1.2, pop., R=pred range | uniform 51, sample cov., R=1 | uniform 51, sample, R=1   | Gaussian 1.2, pop., R=pred range          |
| SSIM (also logged)     | -                          | uniform 51                  | Gaussian 1.5, pop., R=pred range      | Gaussian 1.5                 | uniform 51                                |
| PSNR                   | R=255 on uint8             | R=1 on [0,1]                | R=1                                   | R=1                          | R=1                                       |
| best-of-N selection    | -                          | oracle: best SSIM vs ref of 4 | -                                   | -                            | -                                         |

"FPDM names": `<source>.jpg_2_<target>.jpg.png` paired with the reference image whose path below the reference folder
(searched recursively, e.g. the In-shop `img/` tree) normalises to the same key (pgpis_jax.metrics.images.fpdm_key).
"legacy quirk": torchvision's transform_input formula applied to [0, 1] input (pgpis_jax.metrics.inception
"legacy_pidm"). "whole batches of B": the script uses only the first floor(N / B) * B images (in sorted
order here; the scripts used unsorted glob order). Oracle selection (PCDMs stage 2): of the candidates in
sample_0/ ... sample_{N-1}/, keep per pair the one with the highest SSIM (Gaussian 1.2, population
covariance, R = the candidate's range, uint8 scale) against the reference resized to the candidate's size
with PIL bicubic; results then say "oracle". All SSIM / PSNR arithmetic is float64 (the scripts' float32
differs by ~1e-6).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from pgpis_jax.errors import UserError
from pgpis_jax.metrics.images import MATCH_RULES, Preparation

FID_REAL_SETS = ("reference", "train", "test_targets")
LPIPS_INPUTS = ("minus_one_one", "zero_one_raw")
PER_IMAGE_PRED_RANGE = "per_image_pred_range"


@dataclasses.dataclass(frozen=True)
class SSIMSetting:
    """One SSIM variant (pgpis_jax.metrics.ssim.ssim arguments). Images enter as pixel / 255 * value_scale;
    data_range is a number on that scale or "per_image_pred_range" (max - min of each generated image)."""

    name: str
    window: str
    sigma: float
    win_size: Optional[int]
    use_sample_covariance: bool
    data_range: Union[float, str]
    value_scale: float

    def score(self, generated, reference):
        """SSIM per image [N] of generated / reference images [N, H, W, 3] on the 0..255 pixel scale."""
        from pgpis_jax.metrics import ssim

        scale = self.value_scale / 255.0
        return ssim.ssim(generated * scale, reference * scale, data_range=self.data_range, window=self.window,
                         sigma=self.sigma, win_size=self.win_size, use_sample_covariance=self.use_sample_covariance)


@dataclasses.dataclass(frozen=True)
class PSNRSetting:
    """PSNR = 10 log10(R^2 / MSE) on images entering as pixel / 255 * value_scale, R = data_range."""

    value_scale: float
    data_range: float


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that decides the numbers of one evaluation protocol (see the module table)."""

    name: str
    network_generated: Preparation   # generated images for FID and LPIPS
    network_reference: Preparation   # reference and real images for FID and LPIPS
    pixel_generated: Preparation     # generated images for SSIM and PSNR
    pixel_reference: Preparation     # reference images for SSIM and PSNR
    match: str
    fid_network: str                 # pgpis_jax.metrics.inception variant
    fid_input_transform: str         # pgpis_jax.metrics.inception input transform
    fid_real_set: str                # FID_REAL_SETS
    fid_whole_batches_of: int        # 0: all images
    lpips_net: str
    lpips_input: str                 # LPIPS_INPUTS: [0, 1] images mapped with 2x - 1, or passed unmapped
    lpips_whole_batches_of: int      # 0: all pairs
    ssim: Tuple[SSIMSetting, ...]    # the first is reported as "ssim"
    psnr: PSNRSetting
    oracle_candidates: int           # 1: no selection; N: best of N by `oracle_ssim` against the reference
    oracle_ssim: Optional[SSIMSetting] = None

    def __post_init__(self):
        if self.match not in MATCH_RULES:
            raise ValueError(f"match {self.match!r}: expected one of {MATCH_RULES}")
        if self.fid_real_set not in FID_REAL_SETS:
            raise ValueError(f"fid_real_set {self.fid_real_set!r}: expected one of {FID_REAL_SETS}")
        if self.lpips_input not in LPIPS_INPUTS:
            raise ValueError(f"lpips_input {self.lpips_input!r}: expected one of {LPIPS_INPUTS}")
        if not self.ssim or self.ssim[0].name != "ssim":
            raise ValueError("the first SSIM setting is the reported one and must be named 'ssim'")
        if (self.oracle_candidates > 1) != (self.oracle_ssim is not None):
            raise ValueError("oracle_ssim is given exactly when oracle_candidates > 1")

    def describe(self) -> dict:
        """The protocol's settings as a JSON-able dict (printed and written next to the numbers)."""
        return dataclasses.asdict(self)


def _gaussian(name, sigma, data_range, value_scale):
    return SSIMSetting(name, "gaussian", sigma, None, False, data_range, value_scale)


def _uniform51(name):
    return SSIMSetting(name, "uniform", 0.0, 51, True, 1.0, 1.0)


_NATIVE = Preparation("none", None, "none")
_DF256 = (256, 176)
_DF512 = (512, 352)

STANDARD = Protocol(
    name="standard",
    network_generated=_NATIVE, network_reference=_NATIVE, pixel_generated=_NATIVE, pixel_reference=_NATIVE,
    match="name",
    fid_network="pt_inception", fid_input_transform="pytorch_fid", fid_real_set="reference", fid_whole_batches_of=0,
    lpips_net="alex", lpips_input="minus_one_one", lpips_whole_batches_of=0,
    ssim=(_gaussian("ssim", 1.5, 255.0, 255.0),),
    psnr=PSNRSetting(value_scale=255.0, data_range=255.0),
    oracle_candidates=1)

PCDMS = Protocol(
    name="pcdms",
    network_generated=Preparation("cv2_cubic", _DF256, "none"),
    network_reference=Preparation("cv2_cubic", _DF256, "none"),
    pixel_generated=Preparation("cv2_cubic", _DF256, "none"),
    pixel_reference=Preparation("cv2_cubic", _DF256, "none"),
    match="target_after_to",
    fid_network="torchvision", fid_input_transform="legacy_pidm", fid_real_set="train", fid_whole_batches_of=128,
    lpips_net="alex", lpips_input="zero_one_raw", lpips_whole_batches_of=64,
    ssim=(_gaussian("ssim", 1.2, PER_IMAGE_PRED_RANGE, 255.0), _uniform51("ssim_uniform51")),
    psnr=PSNRSetting(value_scale=1.0, data_range=1.0),
    oracle_candidates=4, oracle_ssim=_gaussian("oracle_ssim", 1.2, PER_IMAGE_PRED_RANGE, 255.0))

CFLD = Protocol(
    name="cfld",
    network_generated=Preparation("bicubic_aa", _DF256, "floor"),
    network_reference=Preparation("pil_bicubic", _DF256, "round"),
    pixel_generated=Preparation("bicubic_aa", _DF256, "floor"),
    pixel_reference=Preparation("pil_bicubic", _DF256, "round"),
    match="name",
    fid_network="torchvision", fid_input_transform="legacy_pidm", fid_real_set="train", fid_whole_batches_of=0,
    lpips_net="alex", lpips_input="minus_one_one", lpips_whole_batches_of=0,
    ssim=(_uniform51("ssim"), _gaussian("ssim_gaussian1.5", 1.5, PER_IMAGE_PRED_RANGE, 255.0)),
    psnr=PSNRSetting(value_scale=1.0, data_range=1.0),
    oracle_candidates=1)

FPDM = Protocol(
    name="fpdm",
    network_generated=Preparation("pil_bicubic", _DF512, "round"),
    network_reference=Preparation("pil_bicubic", _DF512, "round"),
    pixel_generated=Preparation("pil_bicubic", _DF512, "round"),
    pixel_reference=Preparation("pil_bicubic", _DF512, "round"),
    match="fpdm",
    fid_network="torchvision", fid_input_transform="legacy_pidm", fid_real_set="test_targets",
    fid_whole_batches_of=0,
    lpips_net="alex", lpips_input="minus_one_one", lpips_whole_batches_of=10,
    ssim=(_uniform51("ssim"), _gaussian("ssim_gaussian1.5", 1.5, PER_IMAGE_PRED_RANGE, 255.0)),
    psnr=PSNRSetting(value_scale=1.0, data_range=1.0),
    oracle_candidates=1)

PIDM = Protocol(
    name="pidm",
    network_generated=Preparation("cv2_linear", _DF256, "none"),
    network_reference=Preparation("cv2_linear", _DF256, "none"),
    pixel_generated=_NATIVE, pixel_reference=_NATIVE,
    match="target_after_to",
    fid_network="torchvision", fid_input_transform="legacy_pidm", fid_real_set="train", fid_whole_batches_of=64,
    lpips_net="alex", lpips_input="minus_one_one", lpips_whole_batches_of=64,
    ssim=(_gaussian("ssim", 1.2, PER_IMAGE_PRED_RANGE, 255.0), _uniform51("ssim_uniform51")),
    psnr=PSNRSetting(value_scale=1.0, data_range=1.0),
    oracle_candidates=1)

PROTOCOLS = {p.name: p for p in (STANDARD, PCDMS, CFLD, FPDM, PIDM)}
ALIASES = {"nted": "cfld", "reposedm": "pidm"}


def parse_size(text: str) -> Tuple[int, int]:
    """"256x176" -> (256, 176): height x width, both positive."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise UserError(f"eval size {text!r}: expected HEIGHTxWIDTH, e.g. 256x176")
    return int(height), int(width)


def _resized(preparation: Preparation, size: Tuple[int, int]) -> Preparation:
    return preparation if preparation.size is None else dataclasses.replace(preparation, size=size)


def get_protocol(name: str, eval_size: Optional[Tuple[int, int]] = None) -> Protocol:
    """The preset `name` (PROTOCOLS or ALIASES), with every resized image resized to `eval_size`
    (height, width) instead when given. UserError for an unknown name or a size for `standard`."""
    key = ALIASES.get(name, name)
    if key not in PROTOCOLS:
        known = sorted(PROTOCOLS) + sorted(f"{alias} (= {target})" for alias, target in ALIASES.items())
        raise UserError(f"unknown evaluation protocol {name!r}; known: {', '.join(known)}")
    protocol = PROTOCOLS[key]
    if eval_size is None:
        return protocol
    if key == "standard":
        raise UserError("protocol 'standard' scores images at their own size; an eval size needs a paper "
                        f"protocol ({', '.join(p for p in PROTOCOLS if p != 'standard')})")
    return dataclasses.replace(protocol, **{field: _resized(getattr(protocol, field), tuple(eval_size)) for field in
                                            ("network_generated", "network_reference", "pixel_generated",
                                             "pixel_reference")})
