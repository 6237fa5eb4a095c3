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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...devices import resolve_dtype
from . import sde as sde_math
from .base import FlowPolicy, load_pipeline, move_module, tiny_preset

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
DEFAULT_IMAGE_SIZE = 512  # Flow-GRPO trains FLUX at 512 px (DanceGRPO at 720)


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


def build_tiny_flux(size: str = "test", overrides: dict[str, Any] | None = None, seed: int = 0) -> FluxComponents:
    """Tiny random FLUX of the real classes (CLIPTextModel, T5EncoderModel, FluxTransformer2DModel,
    AutoencoderKL), built offline. The same (size, overrides, seed) always gives the same weights, so a
    checkpoint of a tiny run can be resumed."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ...tiny import build_tokenizer

    p = tiny_preset(FLUX_TINY_PRESETS, size, dict(overrides or {}), "FLUX")
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


def load_flux(path: str, dtype: torch.dtype = torch.bfloat16, revision: str = "", timestep_shift: float = 0.0) -> FluxComponents:
    """Load FLUX.1 from a local directory or hub id with `FluxPipeline.from_pretrained` and take its parts."""
    from diffusers import FluxPipeline

    pipe = load_pipeline(FluxPipeline, path, dtype, revision,
                         "model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer*/",
                         "black-forest-labs/FLUX.1-dev", timestep_shift)
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


def flux_schedule_kwargs(scheduler_config: dict[str, Any], image_seq_len: int, timestep_shift: float = 0.0) -> dict[str, float]:
    """Arguments of `sde.sigma_schedule` for FLUX / Qwen-Image at `image_seq_len` packed image tokens.

    `timestep_shift` > 0 (rollout.timestep_shift) replaces the resolution-dependent shift by a static one.
    Otherwise mu grows linearly with the token count (dynamic shifting of the scheduler config); the
    exponential time shift with mu equals the static shift with s = e^mu. A config without dynamic shifting
    uses its static `shift`. The linear time-shift variant of diffusers is not supported (no released
    FLUX / Qwen-Image checkpoint uses it)."""
    if timestep_shift > 0:
        return {"shift": float(timestep_shift)}
    c = scheduler_config
    if not c.get("use_dynamic_shifting", True):
        shift = float(c.get("shift") or 1.0)
        return {"shift": shift} if shift != 1.0 else {}
    if c.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"scheduler time_shift_type='{c.get('time_shift_type')}' is not supported; only 'exponential'")
    mu = sde_math.dynamic_shift_mu(
        image_seq_len,
        int(c.get("base_image_seq_len") or 256),
        int(c.get("max_image_seq_len") or 4096),
        float(c.get("base_shift") if c.get("base_shift") is not None else 0.5),
        float(c.get("max_shift") if c.get("max_shift") is not None else 1.15),
    )
    return {"mu": float(mu)}


def stretch_to_terminal(sigmas_T1: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch a schedule [T+1] (ending in 0) so its last non-zero sigma equals `terminal`; 1 stays 1."""
    s = sigmas_T1[:-1].double()
    one_minus = 1.0 - s
    s = 1.0 - one_minus * (1.0 - terminal) / one_minus[-1]
    return torch.cat([s, s.new_zeros(1)]).to(sigmas_T1.dtype)


def scheduler_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int,
                     timestep_shift: float = 0.0) -> torch.Tensor:
    """The sigma schedule [num_steps + 1] that a FLUX / Qwen-Image pipeline samples with at `image_seq_len` packed
    tokens: shift or mu (`flux_schedule_kwargs`), then, where the scheduler config sets `shift_terminal` (Qwen-Image:
    0.02; FLUX.1 leaves it null), the stretch that makes the last non-zero sigma equal it. Not for one step
    (diffusers divides 0 by 0 there: NaN latents) nor with rollout.timestep_shift (the user's static shift replaces
    the checkpoint's schedule)."""
    sig = sde_math.sigma_schedule(num_steps, **flux_schedule_kwargs(scheduler_config, image_seq_len, timestep_shift))
    term = scheduler_config.get("shift_terminal")
    if term and num_steps > 1 and timestep_shift <= 0:
        sig = stretch_to_terminal(sig, float(term))
    return sig


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
        timestep=(sigma_B * 1000).to(x_BLD.dtype) / 1000,  # the pipeline's rounding: t = 1000 sigma in the latents' dtype
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


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------


def check_image_size(size: int, multiple: int, family: str) -> None:
    if size <= 0 or size % multiple:
        raise ValueError(
            f"model.image_size={size}: {family} needs a positive multiple of {multiple} "
            "(VAE downsampling x 2x2 latent patches); e.g. model.image_size=512"
        )


def save_transformer(transformer: nn.Module, path: str, uses_lora: bool, pipeline_cls_name: str) -> None:
    """LoRA: adapter weights in the diffusers LoRA format of the family's pipeline (load with
    `pipe.load_lora_weights(path)`); full fine-tune: `<path>/transformer` (load with
    `<Transformer>.from_pretrained(path, subfolder='transformer')`)."""
    import os

    os.makedirs(path, exist_ok=True)
    if uses_lora:
        import diffusers
        from peft.utils import get_peft_model_state_dict

        pipe_cls = getattr(diffusers, pipeline_cls_name)
        # the adapter config (rank, alpha, targets) travels with the weights: without it diffusers would
        # load with alpha = r and silently change the LoRA scale
        meta = transformer.peft_config["default"].to_dict()
        pipe_cls.save_lora_weights(
            path, transformer_lora_layers=get_peft_model_state_dict(transformer), transformer_lora_adapter_metadata=meta
        )
    else:
        transformer.save_pretrained(os.path.join(path, "transformer"))


class FluxPolicy(FlowPolicy):
    """FLUX.1 adapter (`model.family: flux`): trains the FluxTransformer2DModel (LoRA or full), with frozen
    CLIP / T5 text encoders and VAE. Latents are packed tokens [L, 4C] throughout (noise, replay, SDE);
    only `decode` unpacks them."""

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_image_size = DEFAULT_IMAGE_SIZE

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        m = cfg.model
        dtype = resolve_dtype(m.dtype)
        if m.tiny:
            comps = build_tiny_flux(m.tiny_size, m.tiny_overrides, seed=cfg.run.seed)
            self.image_size = m.image_size or comps.default_image_size
        else:
            comps = load_flux(m.path, dtype, m.revision, cfg.rollout.timestep_shift)
        self.comps = comps  # tokenizers, scheduler config (plain attributes, not modules)
        self.weight_dtype = dtype
        cast = dtype if m.tiny else None  # from_pretrained already loaded `dtype`
        self.transformer = move_module(comps.transformer, device, cast)
        self.vae = move_module(comps.vae, device, cast)
        self.text_encoder = move_module(comps.text_encoder, device, cast)
        self.text_encoder_2 = move_module(comps.text_encoder_2, device, cast)
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2):
            self.freeze(frozen)
        if m.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.setup_trainable(self.transformer)
        self.transformer.eval()
        check_image_size(self.image_size, 2 * comps.vae_scale_factor, "FLUX")
        self.latent_hw = (self.image_size // comps.vae_scale_factor, self.image_size // comps.vae_scale_factor)
        self.img_ids = flux_image_ids(*self.latent_hw, device=device)
        #: FLUX.1-dev: guidance is an input embedding, no unconditional branch
        self.guidance_distilled = bool(self.transformer.config.guidance_embeds)

    # ---- hooks ------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        return self.transformer

    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.latent_hw
        return ((h // 2) * (w // 2), 4 * self.comps.latent_channels)

    def timestep_schedule_kwargs(self) -> dict[str, float]:
        return flux_schedule_kwargs(self.comps.scheduler_config, self.latent_shape()[0], self.cfg.rollout.timestep_shift)

    def sigma_schedule(self, num_steps: int) -> torch.Tensor:
        return scheduler_sigmas(self.comps.scheduler_config, num_steps, self.latent_shape()[0], self.cfg.rollout.timestep_shift)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        e = encode_flux_prompts(self.comps, prompts, self.device)
        return {"t5": e.t5_BTD, "pooled": e.pooled_BP}

    def training_guidance(self) -> float:
        # FLUX-dev's guidance is an embedding, not a second forward: cfg_in_training=false saves nothing there, and
        # 1.0 would train a low-guidance model that the SFT term (cfg_scale) and deployment (guidance 3.5) never use
        return float(self.cfg.rollout.cfg_scale) if self.guidance_distilled else super().training_guidance()

    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                         guidance: float) -> torch.Tensor:
        if self.guidance_distilled:
            # FLUX.1-dev: one forward with the guidance scale as an embedding (true CFG would double the
            # cost and leave the distribution the model was distilled for)
            g = torch.full((latents.shape[0],), float(guidance), device=latents.device, dtype=torch.float32)
            return self.transformer_forward(latents, sigma, dict(cond, guidance=g))
        return super().predict_velocity(latents, sigma, cond, guidance)

    def transformer_forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.weight_dtype
        g = cond.get("guidance")
        if self.guidance_distilled and g is None:  # sft_loss: condition on the rollout guidance scale
            g = torch.full((latents.shape[0],), float(self.cfg.rollout.cfg_scale), device=latents.device)
        v = flux_velocity(
            self.transformer, latents.to(dtype), sigma, cond["t5"].to(dtype), cond["pooled"].to(dtype), self.img_ids,
            g if self.guidance_distilled else None,
        )
        return v

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_flux_latents(self.vae, latents, *self.latent_hw)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_flux_images(self.vae, images)

    def pipeline(self):
        """A diffusers `FluxPipeline` sharing this policy's modules (inference, `load_lora_weights`, export)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        c = self.comps
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in c.scheduler_config.items() if v is not None}),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=c.tokenizer, text_encoder_2=self.text_encoder_2,
            tokenizer_2=c.tokenizer_2, transformer=self.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, path: str) -> None:
        """LoRA: `pytorch_lora_weights.safetensors` loadable with `FluxPipeline.load_lora_weights(path)`;
        full fine-tuning: a diffusers transformer directory at `path/transformer`."""
        save_transformer(self.transformer, path, self.uses_lora(), "FluxPipeline")
