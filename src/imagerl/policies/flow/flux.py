"""FLUX.1 policy adapter: black-forest-labs FLUX.1-dev / -schnell (and tiny random copies) for Flow-GRPO.

What is FLUX-specific lives here as pure functions plus a thin `FlowPolicy` subclass:

* prompts: CLIP-L **pooled** output (-> `pooled_projections`) plus T5-XXL token states (-> `encoder_hidden_states`),
  T5 padded to a fixed `max_sequence_length` (512 for dev), so every row has the same text length and a
  micro-batch replays exactly the shapes the rollout saw;
* latents: the VAE's 16 (tiny: 4) channels are cut into 2x2 patches and packed to a token sequence
  `[B, (h/2)(w/2), 4C]`; position ids are `(0, row, col)` for image tokens and zeros for text tokens;
* guidance: FLUX.1-dev is guidance-**distilled**: the guidance scale is an *input embedding* of one
  forward, not a cond/uncond mix. With `guidance_embeds=True` (dev) `rollout.cfg_scale` is fed as that
  embedding and no unconditional pass is run. Without it (schnell, or a tiny model built that way) and
  `cfg_scale > 1`, true CFG with an empty negative prompt is used;
* timesteps: resolution-dependent shift: mu is linear in the image token count (0.5 at 256 tokens,
  1.15 at 4096) and sigma' = e^mu / (e^mu + 1/sigma - 1) (exponential time shift of the scheduler config);
* VAE: latents are `(z - shift_factor) * scaling_factor` (0.1159 / 0.3611 for FLUX.1).

Departures from the upstream `FluxPipeline`: the denoising loop is the family-independent SDE loop of
`FlowPolicy` (Flow-GRPO / DanceGRPO noise) instead of the scheduler's deterministic Euler step, and prompt
embeddings are computed once per distinct prompt and shared by its G samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Scheduler config of FLUX.1-dev (scheduler/scheduler_config.json); used for tiny builds and as a fallback.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
    "shift_terminal": None,
}

#: Tiny presets (model.tiny_size). Every key can be overridden through model.tiny_overrides.
FLUX_TINY_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 16 px images, 8x8 latents -> 16 packed tokens, one double + one single block
    "test": dict(
        image_size=16, vae_channels=8, vae_blocks=2, latent_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, axes_dims_rope=[4, 6, 6], text_dim=32, text_layers=1,
        max_sequence_length=16, guidance_embeds=True,
    ),
    # demo runs: 64 px images (256 image tokens), still seconds per step on 2 CPU cores
    "demo": dict(
        image_size=64, vae_channels=16, vae_blocks=2, latent_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=4, axes_dims_rope=[4, 6, 6], text_dim=32, text_layers=2,
        max_sequence_length=32, guidance_embeds=True,
    ),
    # benchmarks: 128 px images (1024 image tokens)
    "bench": dict(
        image_size=128, vae_channels=32, vae_blocks=2, latent_channels=4, num_layers=2, num_single_layers=4,
        attention_head_dim=32, num_attention_heads=4, axes_dims_rope=[8, 12, 12], text_dim=64, text_layers=2,
        max_sequence_length=64, guidance_embeds=True,
    ),
}

#: FLUX.1 was trained with T5 sequences of 512 tokens (dev); schnell uses 256.
DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_IMAGE_SIZE = 512  # Flow-GRPO / DanceGRPO train FLUX at 512 px


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass
class FluxComponents:
    """The parts of a FLUX pipeline the policy uses (the transformer is the only trained one)."""

    transformer: nn.Module  # FluxTransformer2DModel
    vae: nn.Module  # AutoencoderKL
    text_encoder: nn.Module  # CLIPTextModel (pooled output only)
    tokenizer: Any  # CLIP tokenizer (77 tokens)
    text_encoder_2: nn.Module  # T5EncoderModel
    tokenizer_2: Any  # T5 tokenizer
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER_CONFIG))
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    default_image_size: int = DEFAULT_IMAGE_SIZE

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)


def resolve_tiny_preset(
    presets: dict[str, dict[str, Any]], size: str, overrides: dict[str, Any] | None, family: str
) -> dict[str, Any]:
    """Preset `size` with `overrides` applied; unknown names fail naming the config field and valid keys."""
    if size not in presets:
        raise ValueError(f"model.tiny_size='{size}' is not a {family} tiny preset; choose one of {sorted(presets)}")
    p = dict(presets[size])
    for k, v in (overrides or {}).items():
        if k not in p:
            import difflib

            close = difflib.get_close_matches(k, list(p), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"model.tiny_overrides.{k} is not a {family} tiny-model knob.{hint} Valid keys: {', '.join(sorted(p))}"
            )
        p[k] = v
    return p


def build_tiny_flux(size: str = "test", overrides: dict[str, Any] | None = None, seed: int = 0) -> FluxComponents:
    """Tiny random FLUX of the real classes (CLIPTextModel, T5EncoderModel, FluxTransformer2DModel,
    AutoencoderKL), built offline. The same (size, overrides, seed) always gives the same weights, so a
    checkpoint of a tiny run can be resumed."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ...tiny import build_tokenizer

    p = resolve_tiny_preset(FLUX_TINY_PRESETS, size, overrides, "FLUX")
    if sum(p["axes_dims_rope"]) != p["attention_head_dim"]:
        raise ValueError(
            f"model.tiny_overrides: sum(axes_dims_rope)={sum(p['axes_dims_rope'])} must equal "
            f"attention_head_dim={p['attention_head_dim']} (the rotary embedding covers one head)"
        )
    vae_scale = 2 ** (p["vae_blocks"] - 1)
    if p["image_size"] % (2 * vae_scale):
        raise ValueError(
            f"model.tiny_overrides.image_size={p['image_size']} must be a multiple of {2 * vae_scale} "
            "(VAE downsampling x 2x2 latent patches)"
        )
    tok_clip = build_tokenizer(append_eos=True, model_max_length=77)  # CLIP pools at the first EOS
    tok_t5 = build_tokenizer(model_max_length=max(512, p["max_sequence_length"]))
    vocab = len(tok_clip)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab, hidden_size=p["text_dim"], intermediate_size=2 * p["text_dim"], num_attention_heads=4,
                num_hidden_layers=p["text_layers"], projection_dim=p["text_dim"], max_position_embeddings=77,
                hidden_act="gelu", bos_token_id=1, eos_token_id=2, pad_token_id=0,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=vocab, d_model=p["text_dim"], d_kv=8, d_ff=2 * p["text_dim"], num_layers=p["text_layers"],
                num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * p["latent_channels"], out_channels=4 * p["latent_channels"],
            num_layers=p["num_layers"], num_single_layers=p["num_single_layers"],
            attention_head_dim=p["attention_head_dim"], num_attention_heads=p["num_attention_heads"],
            joint_attention_dim=p["text_dim"], pooled_projection_dim=p["text_dim"],
            guidance_embeds=bool(p["guidance_embeds"]), axes_dims_rope=tuple(p["axes_dims_rope"]),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * p["vae_blocks"],
            up_block_types=("UpDecoderBlock2D",) * p["vae_blocks"], block_out_channels=(p["vae_channels"],) * p["vae_blocks"],
            layers_per_block=1, latent_channels=p["latent_channels"], norm_num_groups=4, sample_size=p["image_size"],
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        )
    return FluxComponents(
        transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tok_clip, text_encoder_2=t5, tokenizer_2=tok_t5,
        scheduler_config=dict(FLUX_SCHEDULER_CONFIG), max_sequence_length=int(p["max_sequence_length"]),
        default_image_size=int(p["image_size"]),
    )


def build_tiny_flux_pipeline(size: str = "test", overrides: dict[str, Any] | None = None, seed: int = 0):
    """A whole diffusers `FluxPipeline` from tiny parts (to save as a local 'checkpoint' in tests)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    c = build_tiny_flux(size, overrides, seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in c.scheduler_config.items() if v is not None}),
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
        tokenizer_2=c.tokenizer_2, transformer=c.transformer,
    )


def load_flux(path: str, dtype: torch.dtype = torch.bfloat16, revision: str = "") -> FluxComponents:
    """Load FLUX.1 from a local directory or hub id with `FluxPipeline.from_pretrained` and take its parts."""
    from diffusers import FluxPipeline

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    try:
        pipe = FluxPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise OSError(
            f"model.path='{path}': could not load a FLUX pipeline ({e}). Give a local diffusers directory "
            "(model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer*/) or a hub id such as "
            "black-forest-labs/FLUX.1-dev (downloaded beforehand: HF_HUB_OFFLINE is honoured)"
        ) from e
    sched = {k: pipe.scheduler.config.get(k, v) for k, v in FLUX_SCHEDULER_CONFIG.items()}
    # schnell was distilled for 256 T5 tokens, dev for 512
    max_len = 256 if not pipe.transformer.config.guidance_embeds else DEFAULT_MAX_SEQUENCE_LENGTH
    return FluxComponents(
        transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, scheduler_config=sched,
        max_sequence_length=max_len, default_image_size=DEFAULT_IMAGE_SIZE,
    )


# --------------------------------------------------------------------------------------------------
# Prompt encoding
# --------------------------------------------------------------------------------------------------


@dataclass
class FluxPromptEmbeds:
    """Text conditioning of B prompts."""

    t5_BTD: torch.Tensor  # [B, max_sequence_length, D_t5] T5 token states (-> encoder_hidden_states)
    pooled_BP: torch.Tensor  # [B, P] CLIP pooled output (-> pooled_projections)


def encode_flux_prompts(c: FluxComponents, prompts: list[str], device: torch.device) -> FluxPromptEmbeds:
    """CLIP pooled + T5 states for `prompts`; one encoder forward per list (call it once per distinct prompt)."""
    clip_len = int(min(getattr(c.tokenizer, "model_max_length", 77), 77))
    ids_clip = c.tokenizer(prompts, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt").input_ids
    pooled = c.text_encoder(ids_clip.to(device), output_hidden_states=False).pooler_output
    ids_t5 = c.tokenizer_2(
        prompts, padding="max_length", max_length=c.max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    t5 = c.text_encoder_2(ids_t5.to(device), output_hidden_states=False)[0]
    return FluxPromptEmbeds(t5_BTD=t5, pooled_BP=pooled)


# --------------------------------------------------------------------------------------------------
# Latent layout (shared with Qwen-Image, which packs the same way)
# --------------------------------------------------------------------------------------------------


def pack_latents(z_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches in row-major order, channels before patch offsets."""
    b, c, h, w = z_BCHW.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even for 2x2 packing, got {h}x{w}")
    x = z_BCHW.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x_BLD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w] (h, w: latent size)."""
    b, n, d = x_BLD.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(x_BLD.shape)} to a {h}x{w} latent")
    x = x_BLD.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def flux_image_ids(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE ids of the packed image tokens of an h x w latent: [(h/2)(w/2), 3] = (0, row, col)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.to(dtype)


def dynamic_shift_mu(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """mu of the resolution-dependent time shift: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def shifted_sigmas(
    num_steps: int, mu: float, shift_terminal: float | None = None, time_shift_type: str = "exponential"
) -> torch.Tensor:
    """Noise levels [num_steps + 1] from 1 down to 0 with the dynamic time shift of FLUX / Qwen-Image.

    Uniform sigmas in (0, 1] are shifted: exponential sigma' = e^mu / (e^mu + 1/sigma - 1), linear
    sigma' = mu / (mu + 1/sigma - 1); optionally stretched so the last non-zero sigma is `shift_terminal`
    (Qwen-Image uses 0.02); a terminal 0 is appended."""
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if time_shift_type == "exponential":
        s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    elif time_shift_type == "linear":
        s = mu / (mu + (1.0 / s - 1.0))
    else:
        raise ValueError(f"unknown time_shift_type '{time_shift_type}' (exponential | linear)")
    if shift_terminal:
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    return torch.cat([s, s.new_zeros(1)]).to(torch.float32)


def flux_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int, shift_override: float = 0.0) -> torch.Tensor:
    """The sigma schedule [num_steps + 1] FLUX samples with at this resolution.

    `shift_override` > 0 replaces the resolution-dependent shift by the static SD3-style shift
    sigma' = s*sigma / (1 + (s-1)*sigma) (rollout.timestep_shift)."""
    if shift_override > 0:
        s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
        s = shift_override * s / (1 + (shift_override - 1) * s)
        return torch.cat([s, s.new_zeros(1)]).to(torch.float32)
    cfg = scheduler_config
    if not cfg.get("use_dynamic_shifting", True):
        return flux_sigmas(scheduler_config, num_steps, image_seq_len, float(cfg.get("shift", 1.0)) or 1.0)
    mu = dynamic_shift_mu(
        image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
    )
    return shifted_sigmas(num_steps, mu, cfg.get("shift_terminal"), cfg.get("time_shift_type", "exponential"))


# --------------------------------------------------------------------------------------------------
# Transformer call and VAE
# --------------------------------------------------------------------------------------------------


def flux_velocity(
    transformer: nn.Module,
    x_BLD: torch.Tensor,
    sigma_B: torch.Tensor,
    t5_BTD: torch.Tensor,
    pooled_BP: torch.Tensor,
    img_ids: torch.Tensor,
    guidance_B: torch.Tensor | None,
) -> torch.Tensor:
    """One FLUX transformer forward -> velocity [B, L, D] (prediction of noise - data at noise level sigma).

    The transformer multiplies timestep and guidance by 1000 itself, so sigma in [0, 1] goes in."""
    txt_ids = torch.zeros(t5_BTD.shape[1], 3, device=x_BLD.device, dtype=img_ids.dtype)
    return transformer(
        hidden_states=x_BLD,
        encoder_hidden_states=t5_BTD,
        pooled_projections=pooled_BP,
        timestep=sigma_B.to(x_BLD.dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance_B,
        return_dict=False,
    )[0]


def decode_flux_latents(vae: nn.Module, x_BLD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed latents -> images [B, 3, H, W] in [0, 1] (undo the VAE's shift and scale first)."""
    z = unpack_latents(x_BLD, h, w)
    sf = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    z = z / sf + shift
    img = vae.decode(z.to(next(vae.parameters()).dtype), return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def encode_flux_images(vae: nn.Module, images_B3HW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] -> packed, shifted and scaled latents [B, L, D] (targets of the SFT loss)."""
    x = images_B3HW.to(next(vae.parameters()).dtype) * 2 - 1
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator) if generator is not None else dist.mode()
    z = (z - float(vae.config.shift_factor or 0.0)) * float(vae.config.scaling_factor)
    return pack_latents(z.float())
