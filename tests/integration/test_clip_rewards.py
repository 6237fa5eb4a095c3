"""CLIP-family rewards on tiny random-weight `CLIPModel`s (the real class), offline.

Scores are checked against an independent computation: transformers' own `CLIPModel.forward`
(logits_per_image = exp(logit_scale) * normalised image @ normalised text), fed by the transformers PIL
image processor and the tokenizer, so a mistake in our preprocessing, pooling, normalisation or scaling
shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imagerl.rewards.base import build_reward
from imagerl.rewards.clip import (
    CLIPScoreReward,
    ClipPreprocess,
    HPSReward,
    PickScoreReward,
    build_tiny_clip,
    preprocess_images,
)
from imagerl.types import RewardInput

PROMPTS = ["a red square on the left", "a blue circle on the top", "a photo of a cat", "a sign that says hello"]


def smooth_images(n: int, h: int = 48, w: int = 64, seed: int = 0, cells: tuple[int, int] = (4, 5)) -> torch.Tensor:
    """[n,3,h,w] low-frequency random images (resampling differences between PIL and torch stay small)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, *cells, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True).clamp(0, 1)


def batch(images: torch.Tensor, prompts: list[str]) -> RewardInput:
    return RewardInput(images=images, prompts=prompts, metadata=[{}] * len(prompts))


def pil_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    return torch.as_tensor(np.asarray(proc(images=pils, return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("h,w,size", [(48, 64, 32), (320, 720, 224)])  # 720x320: int(720 * 0.7) would be 503
def test_torch_preprocessing_matches_transformers_pil_processor(h, w, size):
    # detail at about 8 px: a crop one pixel off moves the mean difference from 0.005 to 0.08
    images = smooth_images(2, h, w, cells=(h // 8, w // 8))
    ours = preprocess_images(images, ClipPreprocess(size, (size, size)))
    ref = pil_pixels(images, size)
    assert ours.shape == ref.shape == (2, 3, size, size)
    assert (ours - ref).abs().mean() < 0.01  # PIL resamples 8-bit pixels; we resample floats
    assert (ours - ref).abs().max() < 0.05


def test_preprocess_config_from_json_dicts():
    pp = ClipPreprocess.from_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    assert pp == ClipPreprocess(224, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert ClipPreprocess.from_config({"size": 336, "crop_size": 336}).crop == (336, 336)
    # a non-square image: shortest side to 224, centre crop 224x224
    out = preprocess_images(torch.rand(2, 3, 100, 300), ClipPreprocess(224, (224, 224)))
    assert out.shape == (2, 3, 224, 224)


def processor_pixels(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """transformers' own `CLIPImageProcessor` built offline from a preprocessor_config.json dict, on the 8-bit
    images (the PIL backend where torchvision is absent, as here)."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_dict(cfg)
    u8 = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]
    return torch.as_tensor(np.asarray(proc(images=u8, return_tensors="np")["pixel_values"])).float()


# (image h, w, preprocessor_config.json); every image is non-square, so squashing, keeping the aspect ratio and
# cropping or not all give different pixels
PROCESSOR_CONFIGS = {
    "shortest_edge_int": (48, 64, {"size": 32, "crop_size": 32}),
    "height_width_non_square": (48, 64, {"size": {"height": 28, "width": 36}, "crop_size": {"height": 24, "width": 32}}),
    "height_width_square_squash": (48, 64, {"size": {"height": 32, "width": 32}, "crop_size": 32}),
    "height_width_upscale": (30, 50, {"size": {"height": 40, "width": 44}, "crop_size": {"height": 40, "width": 44}}),
    "no_center_crop": (48, 64, {"size": {"shortest_edge": 32}, "crop_size": 32, "do_center_crop": False}),
    "no_center_crop_tall": (64, 40, {"size": {"shortest_edge": 32}, "crop_size": 32, "do_center_crop": False}),
    "no_resize": (48, 64, {"size": 32, "crop_size": 32, "do_resize": False}),
    "no_rescale_no_normalize": (48, 64, {"size": 32, "crop_size": 32, "do_rescale": False, "do_normalize": False}),
    "bilinear": (48, 64, {"size": 32, "crop_size": 32, "resample": 2}),
    "crop_larger_than_resize": (48, 64, {"size": 20, "crop_size": {"height": 25, "width": 31}, "image_mean": 0.5,
                                         "image_std": 0.5}),
}


@pytest.mark.parametrize("h,w,cfg", list(PROCESSOR_CONFIGS.values()), ids=list(PROCESSOR_CONFIGS))
def test_preprocessing_matches_clip_image_processor_built_from_the_config(h, w, cfg):
    # measured: mean |diff| <= 0.005 and max <= 0.016 in every case here (PIL resamples 8-bit pixels, we resample
    # floats); reading {height, width} as a shortest edge was off by 0.09-0.56 on average, an ignored
    # do_center_crop / do_resize / do_rescale by 0.5-1.0 or in shape, bicubic for resample: 2 by 0.012
    images = smooth_images(3, h, w, cells=(h // 8, w // 8))
    images = (images * 255).round() / 255  # the 8-bit pixels the processor sees
    ours = preprocess_images(images, ClipPreprocess.from_config(cfg))
    ref = processor_pixels(images, cfg)
    if cfg.get("do_rescale") is False:  # 0..255 pixel units: compare in the others' [0, 1] units
        ours, ref = ours / 255, ref / 255
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.01
    assert (ours - ref).abs().max() < 0.05


def test_preprocess_config_reads_size_forms_and_flags():
    # {height, width} is an exact size (squashed, not a shortest edge); a missing crop_size is the processor's 224
    pp = ClipPreprocess.from_config({"size": {"height": 224, "width": 336}})
    assert pp.resize == (224, 336) and pp.crop == (224, 224)
    assert ClipPreprocess.from_config({"size": [200, 300]}).resize == (200, 300)
    assert ClipPreprocess.from_config({"size": 200, "default_to_square": True}).resize == (200, 200)
    pp = ClipPreprocess.from_config({"do_resize": False, "do_center_crop": False, "do_rescale": False,
                                     "do_normalize": False})
    assert (pp.resize, pp.crop, pp.rescale, pp.normalize) == (None, None, 255.0, False)
    assert ClipPreprocess.from_config({"do_resize": None}).resize is None  # null is off for the processor too
    out = preprocess_images(torch.rand(2, 3, 100, 300), ClipPreprocess.from_config({"size": {"height": 64, "width": 48},
                                                                                      "do_center_crop": False}))
    assert out.shape == (2, 3, 64, 48)


def test_unsupported_preprocessor_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"size=\{'longest_edge': 224\} is not supported.*shortest_edge"):
        ClipPreprocess.from_config({"size": {"longest_edge": 224}})
    with pytest.raises(ValueError, match=r"resample=1 is not supported.*3 \(bicubic"):
        ClipPreprocess.from_config({"resample": 1})
    with pytest.raises(ValueError, match=r"crop_size=\{'shortest_edge': 224\} is not a crop: give \{height: H, width: W\}"):
        ClipPreprocess.from_config({"crop_size": {"shortest_edge": 224}})
    ClipPreprocess.from_config({"resample": 1, "do_resize": False})  # (no resize: the filter is never used)
    # from a checkpoint: the error names the reward's args.processor and the config key
    import json

    tiny = build_tiny_clip(seed=0)
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "proc")
    (tmp_path / "proc" / "preprocessor_config.json").write_text(json.dumps({"size": {"max_height": 32, "max_width": 32}}))
    with pytest.raises(ValueError, match=r"^rewards\[0\].args.processor='.*proc': its preprocessor_config.json "
                                         r"size=\{'max_height': 32, 'max_width': 32\} is not supported"):
        build_reward({"type": "pickscore", "args": {"model": str(tmp_path / "model"), "processor": str(tmp_path / "proc"),
                                                    "device": "cpu"}})


def test_scores_equal_clip_forward_logits():
    images = smooth_images(4)
    pick = PickScoreReward(tiny=True, device="cpu")
    out = pick(batch(images, PROMPTS))
    assert out.scores.shape == (4,) and torch.isfinite(out.scores).all()
    # independent path: transformers' PIL processor + CLIPModel.forward's own normalisation and logit scale
    tiny = build_tiny_clip(seed=0)
    tok = tiny.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = tiny.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                            pixel_values=pil_pixels(images, 32)).logits_per_image  # [N images, N texts]
    assert torch.allclose(out.scores, logits.diagonal(), atol=0.01 * float(logits.abs().max()))
    # the matched prompt is the diagonal, not some other entry: off-diagonal logits differ
    assert not torch.allclose(logits.diagonal(), logits[:, 0], atol=1e-4)


def test_modes_and_rewards_share_one_cosine():
    images = smooth_images(4, seed=1)
    inp = batch(images, PROMPTS)
    cos = CLIPScoreReward(tiny=True, device="cpu")(inp).scores
    assert (cos.abs() <= 1.0 + 1e-6).all()
    scale = math.exp(float(build_tiny_clip(seed=0).model.logit_scale.detach()))
    assert torch.allclose(CLIPScoreReward(tiny=True, mode="logit")(inp).scores, scale * cos, atol=1e-5)
    assert torch.allclose(CLIPScoreReward(tiny=True, mode="clipscore")(inp).scores, 2.5 * cos.clamp_min(0), atol=1e-6)
    assert torch.allclose(PickScoreReward(tiny=True)(inp).scores, scale * cos, atol=1e-5)
    assert torch.allclose(HPSReward(tiny=True)(inp).scores, cos, atol=1e-6)


def test_deterministic_batch_invariant_and_seeded():
    images = smooth_images(5, seed=2)
    prompts = PROMPTS + ["a yellow star on the bottom " * 30]  # long prompt: truncated to 77 tokens, not an error
    a = CLIPScoreReward(tiny=True, batch_size=5)(batch(images, prompts)).scores
    b = CLIPScoreReward(tiny=True, batch_size=2)(batch(images, prompts)).scores
    c = CLIPScoreReward(tiny=True, batch_size=1)(batch(images, prompts)).scores
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    other = CLIPScoreReward(tiny=True, seed=1)(batch(images, prompts)).scores
    assert not torch.allclose(a, other, atol=1e-3)  # the seed is the weights
    before = torch.random.get_rng_state()
    CLIPScoreReward(tiny=True)
    assert torch.equal(before, torch.random.get_rng_state())  # building tiny weights leaves the global RNG alone


def test_tiny_text_tower_pools_at_eos():
    tiny = build_tiny_clip()
    ids = tiny.tokenizer(["a cat"], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tiny.tokenizer.bos_token_id and ids[-1] == tiny.tokenizer.eos_token_id == 3
    assert tiny.model.config.text_config.eos_token_id == 3  # not 2: the legacy argmax pooling would be used


def test_loads_a_saved_checkpoint_from_a_local_path(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tiny = build_tiny_clip(seed=0)
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "proc")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "proc")
    images = smooth_images(3, seed=3)
    loaded = build_reward({"type": "pickscore", "args": {"model": str(tmp_path / "model"), "processor": str(tmp_path / "proc"),
                                                        "device": "cpu"}})
    ref = PickScoreReward(tiny=True)
    assert torch.allclose(loaded(batch(images, PROMPTS[:3])).scores, ref(batch(images, PROMPTS[:3])).scores, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="hps.*open_clip.*convert"):
        HPSReward()
    with pytest.raises(ValueError, match="args.model='/nonexistent/clip'"):
        CLIPScoreReward(model="/nonexistent/clip")
    with pytest.raises(ValueError, match="args.mode"):
        CLIPScoreReward(tiny=True, mode="softmax")
    with pytest.raises(ValueError, match=r"reward 'PickScoreReward': args.dtype='fp8' is not valid; use one of fp32, bf16, fp16"):
        PickScoreReward(tiny=True, dtype="fp8")
    with pytest.raises(ValueError, match=r"reward 'PickScoreReward': args.device='cuda:0x' is not a device"):
        PickScoreReward(tiny=True, device="cuda:0x")
