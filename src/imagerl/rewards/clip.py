"""CLIP-family rewards: image-text similarity from a transformers `CLIPModel`.

All three embed the image and the prompt, L2-normalise both and take the cosine; they differ in the
checkpoint and in the scale applied to the cosine:

- ``clip_score``: a CLIP model (default ``openai/clip-vit-large-patch14``); ``mode`` picks the output:
  ``cosine`` (default, in [-1, 1]), ``logit`` (exp(logit_scale) * cosine, the model's own logit, ~100 *
  cosine for OpenAI CLIP), or ``clipscore`` (2.5 * max(cosine, 0), CLIPScore of Hessel et al., 2021).
- ``pickscore``: PickScore (Kirstain et al., 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences:
  exp(logit_scale) * cosine, as its reference inference does. Default model ``yuvalkirstain/PickScore_v1``
  with the tokenizer / preprocessing of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- ``hps``: HPSv2-style (Wu et al., 2023): the plain cosine of a CLIP ViT-H fine-tuned on human preference
  data. HPSv2 is published as an open_clip checkpoint (``xswu/HPSv2``, ``HPS_v2.1_compressed.pt``);
  loading open_clip checkpoints is out of scope here, so ``model`` must name a copy converted to the
  transformers ``CLIPModel`` format (there is no default), with the ViT-H processor as above.

Images are preprocessed in torch, not by the transformers image processor (whose fast backend needs
torchvision), following the checkpoint's ``preprocessor_config.json`` as `CLIPImageProcessor` does: resize
(``size``: an int or ``shortest_edge`` scales the shortest side, keeping the aspect ratio; ``height``/``width``
resizes to exactly that) with bicubic + antialias, centre crop, rescale, normalise with its mean/std, each
step skipped where its ``do_*`` flag is false. This matches the PIL processor to about 1e-2 in normalised pixel
units (PIL resamples 8-bit images; we resample floats). Prompts longer than the text tower's context (77
tokens for CLIP) are truncated, as every CLIP scorer does.

``tiny: true`` builds a small random-weight `CLIPModel` of the real class (offline; tests and demos).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..devices import resolve_device, resolve_dtype
from ..types import RewardInput, RewardOutput
from .base import Reward, building_field

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# PIL resampling codes (transformers' `resample`) we reproduce, and the torch mode that matches each when run
# with antialias (torch's antialiased kernels are PIL's: bicubic with a = -0.5, triangle for bilinear)
RESAMPLE_MODES = {3: "bicubic", 2: "bilinear"}


@dataclass
class ClipPreprocess:
    """How a checkpoint wants its pixels, step for step as transformers' `CLIPImageProcessor`: resize, centre
    crop, rescale, normalise, each skipped when the checkpoint's preprocessor_config.json turns it off."""

    resize: int | tuple[int, int] | None  # int: shortest edge; (height, width): exactly that size; None: no resize
    crop: tuple[int, int] | None  # (height, width); None: no centre crop
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    normalize: bool = True
    rescale: float = 1.0  # on our [0, 1] pixels: 255 * rescale_factor, or 255 (the 8-bit values) with no rescale
    resample: str = "bicubic"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ClipPreprocess":
        """Read a preprocessor_config.json as `CLIPImageProcessor` does: its defaults for missing keys, and a null
        do_* flag is off there too. Size forms and resampling filters we do not reproduce are refused, not ignored.
        (do_convert_rgb changes nothing here: our images are RGB already.)"""
        resize, resample = None, 3
        if cfg.get("do_resize", True):
            square = bool(cfg.get("default_to_square", False))
            resize = _size_from_config(cfg.get("size", {"shortest_edge": 224}), square)
            resample = cfg.get("resample", 3)
            if resample not in RESAMPLE_MODES:
                raise ValueError(f"resample={resample!r} is not supported: CLIP preprocessing here reproduces 3 "
                                 f"(bicubic, CLIP's own) and 2 (bilinear); use a processor checkpoint with one of those")
        crop = None
        if cfg.get("do_center_crop", True):
            crop_size = cfg.get("crop_size", {"height": 224, "width": 224})
            crop = _size_from_config(crop_size, True, field="crop_size") if crop_size is not None else None
            if not isinstance(crop, tuple):
                raise ValueError(f"crop_size={crop_size!r} is not a crop: give {{height: H, width: W}} or an int "
                                 f"(or set do_center_crop: false)")
        rescale = 255.0  # do_rescale: false leaves the 8-bit values, 0..255
        if cfg.get("do_rescale", True):
            if not isinstance(cfg.get("rescale_factor", 1 / 255), (int, float)):
                raise ValueError(f"rescale_factor={cfg.get('rescale_factor')!r} must be a number with do_rescale: true")
            rescale = 255.0 * float(cfg.get("rescale_factor", 1 / 255))
        normalize = bool(cfg.get("do_normalize", True))
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # unused without normalisation
        if normalize:
            mean = _per_channel(cfg.get("image_mean", OPENAI_CLIP_MEAN), "image_mean")
            std = _per_channel(cfg.get("image_std", OPENAI_CLIP_STD), "image_std")
        return cls(resize, crop, mean, std, normalize, rescale, RESAMPLE_MODES[resample])


def _size_from_config(size: Any, default_to_square: bool, field: str = "size") -> int | tuple[int, int]:
    """A processor `size` / `crop_size` as transformers' get_size_dict reads it: an int is the shortest edge
    (CLIP's default_to_square is false; crop_size is always square), a [h, w] list or {height, width} is an
    exact size. -> int (shortest edge) or (height, width)."""
    def positive(*vals: Any) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals)

    if positive(size):
        return (size, size) if default_to_square else size
    if isinstance(size, (list, tuple)) and len(size) == 2 and positive(*size):
        return (size[0], size[1])
    if isinstance(size, dict) and set(size) == {"shortest_edge"} and positive(size["shortest_edge"]):
        return size["shortest_edge"]
    if isinstance(size, dict) and set(size) == {"height", "width"} and positive(size["height"], size["width"]):
        return (size["height"], size["width"])
    # (longest_edge, max_height, min_pixels... are transformers size dicts too, but no CLIP checkpoint uses them)
    raise ValueError(f"{field}={size!r} is not supported: CLIP preprocessing here takes a positive int, "
                     f"{{shortest_edge: N}} or {{height: H, width: W}}; use a processor checkpoint with one of those")


def _per_channel(v: Any, field: str) -> tuple[float, float, float]:
    # the processor broadcasts a single number over the channels
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (float(v),) * 3
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
        raise ValueError(f"{field}={v!r} must be one number or a list of three (RGB), as required with do_normalize: true")
    return (float(v[0]), float(v[1]), float(v[2]))


def _center_crop(x: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """The PIL processor's centre crop: offset (size - crop) // 2, and where the image is smaller than the crop,
    zero padding (black, before rescaling) with the image at ceil((crop - size) / 2)."""
    out = x.new_zeros(*x.shape[:-2], *crop_hw)
    src, dst = [], []
    for n, c in zip(x.shape[-2:], crop_hw):
        if n >= c:
            src.append(slice((n - c) // 2, (n - c) // 2 + c))
            dst.append(slice(0, c))
        else:
            src.append(slice(0, n))
            dst.append(slice((c - n + 1) // 2, (c - n + 1) // 2 + n))
    out[..., dst[0], dst[1]] = x[..., src[0], src[1]]
    return out


def preprocess_images(images_N3HW: torch.Tensor, pp: ClipPreprocess) -> torch.Tensor:
    """[N,3,H,W] in [0,1] -> CLIP pixel values [N,3,crop_h,crop_w] (float32; uncropped size with no crop)."""
    x = images_N3HW.float()
    h, w = x.shape[-2:]
    if pp.resize is not None:
        if isinstance(pp.resize, int):
            # the transformers processors' shortest-edge rule: short side -> resize, long side -> int(resize * long / short)
            # (in that order of operations: int(long * (resize / short)) can land one pixel lower, e.g. 720x320 -> 503
            # instead of 504, and a one-pixel difference shifts the whole crop)
            long_side = int(pp.resize * max(h, w) / min(h, w))
            new_hw = (pp.resize, long_side) if h <= w else (long_side, pp.resize)
        else:
            new_hw = pp.resize  # {height, width}: exactly that size, the aspect ratio is not kept
        if new_hw != (h, w):
            x = F.interpolate(x, size=new_hw, mode=pp.resample, antialias=True, align_corners=False)
        x = x.clamp(0, 1)  # bicubic overshoots; PIL resamples 8-bit pixels, which clips
    if pp.crop is not None:
        x = _center_crop(x, pp.crop)
    if pp.rescale != 1.0:
        x = x * pp.rescale
    if not pp.normalize:
        return x
    mean = torch.tensor(pp.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _features(out: Any) -> torch.Tensor:
    # transformers >= 5 returns an output object whose pooler_output is the projected embedding
    return out.pooler_output if hasattr(out, "pooler_output") else out


def clip_cosine(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Cosine between each image and its own prompt -> [N] (row i with row i, not the full matrix)."""
    img_ND = _features(model.get_image_features(pixel_values=pixel_values)).float()
    txt_ND = _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
    return (F.normalize(img_ND, dim=-1) * F.normalize(txt_ND, dim=-1)).sum(-1)


@dataclass
class ClipBundle:
    model: Any  # transformers CLIPModel, eval mode
    tokenizer: Any
    preprocess: ClipPreprocess


TINY_EOS_SPECIALS = ("<pad>", "<bos>", "<unk>", "<eos>")


def build_tiny_clip(seed: int = 0, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                    projection_dim: int = 16) -> ClipBundle:
    """A random-weight `CLIPModel` with two-layer towers and the offline BPE tokenizer, built offline.

    The tokenizer appends <eos> and its id is 3, not 2: transformers' CLIP text tower treats
    eos_token_id == 2 as a legacy config and pools at the largest token id instead of at the first <eos>.
    Weights come from `seed` without touching the global RNG."""
    from transformers import CLIPConfig, CLIPModel

    from ..tiny import build_tokenizer

    tok = build_tokenizer(specials=TINY_EOS_SPECIALS, append_eos=True, model_max_length=77)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                  projection_dim=projection_dim)
    cfg = CLIPConfig(
        text_config=dict(common, vocab_size=len(tok), max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(common, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    return ClipBundle(model.eval(), tok, ClipPreprocess(image_size, (image_size, image_size)))


def _read_preprocessor_config(source: str, revision: str | None) -> dict[str, Any]:
    if os.path.isdir(source):
        path = os.path.join(source, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{source} has no preprocessor_config.json")
    else:
        from transformers.utils import cached_file

        path = cached_file(source, "preprocessor_config.json", revision=revision)
    with open(path) as f:
        return json.load(f)


def load_clip(model: str, processor: str | None = None, revision: str | None = None, field: str = "args") -> ClipBundle:
    """A `CLIPModel` from a local directory or hub id; tokenizer and preprocessing from `processor`
    (another checkpoint, e.g. PickScore uses the LAION ViT-H processor) or from `model` itself."""
    from transformers import AutoTokenizer, CLIPModel

    proc = processor or model
    try:
        m = CLIPModel.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}.model='{model}': cannot load a transformers CLIPModel from it ({e}). Give a local "
                         f"directory or a hub id that is in the local cache (HF_HUB_OFFLINE=1 runs cannot download), "
                         f"or use tiny: true") from e
    try:
        tok = AutoTokenizer.from_pretrained(proc, revision=revision)
        pp_cfg = _read_preprocessor_config(proc, revision)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}.processor='{proc}': cannot load the CLIP tokenizer / preprocessor_config.json ({e})") from e
    try:
        pp = ClipPreprocess.from_config(pp_cfg)
    except ValueError as e:
        raise ValueError(f"{field}.processor='{proc}': its preprocessor_config.json {e}") from e
    return ClipBundle(m.eval(), tok, pp)


class CLIPFamilyReward(Reward):
    """Shared loading and batched, no-grad scoring; subclasses choose the checkpoint and `transform`.

    Args (YAML ``args``):
        model: local directory or hub id of a transformers `CLIPModel`.
        processor: checkpoint whose tokenizer and preprocessor_config.json to use (default: the reward's
            default processor, else `model`).
        tiny: build a tiny random-weight CLIP instead (offline; ignores model/processor).
        device: ``auto`` (default: CUDA if available), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``fp32`` (default), ``bf16`` or ``fp16`` weights.
        batch_size: images per forward pass (default 32).
        revision: hub revision (default: the checkpoint's default branch).
        seed: weights seed for ``tiny`` (default 0).
    """

    default_model: str = ""
    default_processor: str | None = None

    def __init__(self, *, name: str = "", model: str | None = None, processor: str | None = None, tiny: bool = False,
                 device: str = "auto", dtype: str = "fp32", batch_size: int = 32, revision: str | None = None,
                 seed: int = 0) -> None:
        super().__init__(name)
        if int(batch_size) < 1:
            raise ValueError(f"reward '{self.name}': args.batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device, field=f"reward '{self.name}': args.device")
        self.dtype = resolve_dtype(dtype, field=f"reward '{self.name}': args.dtype")
        self.batch_size = int(batch_size)
        if tiny:
            bundle = build_tiny_clip(seed=seed)
        else:
            model_id = model or self.default_model
            if not model_id:
                raise ValueError(self.missing_model_message())
            # (rewards[0].args when built from the config: the path in the user's YAML)
            where = f"{building_field()}.args" if building_field() else f"reward '{self.name}' args"
            bundle = load_clip(model_id, processor or self.default_processor or model_id, revision, field=where)
        self.model = bundle.model.to(self.device, self.dtype).requires_grad_(False)
        self.tokenizer = bundle.tokenizer
        self.preprocess = bundle.preprocess
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._lock = threading.Lock()  # one forward at a time when score_async runs us in worker threads

    def missing_model_message(self) -> str:
        return f"reward '{self.name}': args.model is required (a local directory or hub id of a CLIPModel), or set tiny: true"

    def transform(self, cos_N: torch.Tensor) -> torch.Tensor:
        """Cosine [N] -> reward [N]."""
        return cos_N

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def cosine(self, images_N3HW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Image-prompt cosine [N] (float32, on CPU), in batches of `batch_size`."""
        outs = []
        for s in range(0, len(prompts), self.batch_size):
            pix = preprocess_images(images_N3HW[s : s + self.batch_size].to(self.device), self.preprocess)
            tok = self.tokenizer(prompts[s : s + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            outs.append(clip_cosine(self.model, pix.to(self.dtype), tok["input_ids"], tok.get("attention_mask")).cpu())
        return torch.cat(outs) if outs else torch.zeros(0)

    def score(self, inp: RewardInput) -> RewardOutput:
        with self._lock:
            cos = self.cosine(inp.images, list(inp.prompts))
        return RewardOutput(scores=self.transform(cos), details={"cosine": cos.tolist()})


class CLIPScoreReward(CLIPFamilyReward):
    """``clip_score``: CLIP image-prompt similarity. ``mode``: ``cosine`` (default), ``logit``
    (exp(logit_scale) * cosine) or ``clipscore`` (2.5 * max(cosine, 0), Hessel et al. 2021)."""

    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, *, name: str = "", mode: str = "cosine", model: str | None = None, processor: str | None = None,
                 tiny: bool = False, device: str = "auto", dtype: str = "fp32", batch_size: int = 32,
                 revision: str | None = None, seed: int = 0) -> None:
        if mode not in ("cosine", "logit", "clipscore"):
            raise ValueError(f"reward '{name}': args.mode must be cosine, logit or clipscore, got '{mode}'")
        super().__init__(name=name, model=model, processor=processor, tiny=tiny, device=device, dtype=dtype,
                         batch_size=batch_size, revision=revision, seed=seed)
        self.mode = mode

    def transform(self, cos_N: torch.Tensor) -> torch.Tensor:
        if self.mode == "logit":
            return self.logit_scale * cos_N
        if self.mode == "clipscore":
            return 2.5 * cos_N.clamp_min(0.0)
        return cos_N


class PickScoreReward(CLIPFamilyReward):
    """``pickscore``: exp(logit_scale) * cosine of PickScore_v1 (about 18-24 for typical images)."""

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def transform(self, cos_N: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * cos_N


class HPSReward(CLIPFamilyReward):
    """``hps``: HPSv2-style cosine of a preference-tuned CLIP ViT-H converted to transformers format."""

    default_model = ""  # HPSv2 ships as an open_clip checkpoint only: the user must convert it
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def missing_model_message(self) -> str:
        return (f"reward '{self.name}' (hps): args.model is required. HPSv2 is published as an open_clip checkpoint "
                f"(xswu/HPSv2, HPS_v2.1_compressed.pt), which this loader does not read: convert it to a transformers "
                f"CLIPModel directory (ViT-H-14 architecture) and pass that path; args.processor defaults to "
                f"{self.default_processor}. Or set tiny: true for tests")

