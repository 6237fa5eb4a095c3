"""Stable Diffusion 3 / 3.5 policy adapter (registered as model.family=sd3).

Real weights: `StableDiffusion3Pipeline.from_pretrained(model.path)` (a local directory or hub id, e.g.
stabilityai/stable-diffusion-3.5-medium): MMDiT `SD3Transformer2DModel`, `AutoencoderKL` (16 latent
channels, x8), two CLIP text encoders with projection and a T5 encoder. Only the transformer is trained
(LoRA on to_q/to_k/to_v/to_out.0 with diffusers' `add_adapter`, or full fine-tuning); the VAE and text
encoders are frozen.

Offline (model.tiny=true): the same classes at tiny size with random weights and an offline BPE
tokenizer; presets `test` (16 px, unit tests), `demo` (32 px, CPU demo), `bench` (64 px, benchmark),
knobs overridable with model.tiny_overrides (e.g. {num_layers: 4}).

Text conditions are computed with the pipeline's own `encode_prompt` (penultimate CLIP layers, CLIP
padded to the T5 width and concatenated with T5 along the sequence, pooled CLIP projections), padded to a
fixed length so that rows from different prompts stack. Timestep convention: t = 1000 * sigma.
Default static shift 3.0 (SD3's scheduler config); rollout.timestep_shift overrides it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ...config import Config
from ...devices import resolve_dtype
from . import sde as sde_math
from .base import FlowPolicy, load_pipeline, move_module, tiny_preset

TINY_PRESETS: dict[str, dict[str, Any]] = {
    # image_size px; the x2 VAE gives latent = image_size / 2; patch 2 -> (image_size / 4)^2 tokens
    "test": dict(image_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=8, latent_channels=4,
                 vae_channels=8, clip_hidden=16, t5_dim=32, max_sequence_length=16, clip_length=16, vocab_size=320, vae_out_gain=1.0, vae_groups=4),
    "demo": dict(image_size=32, num_layers=2, num_attention_heads=4, attention_head_dim=8, latent_channels=4,
                 vae_channels=8, clip_hidden=16, t5_dim=32, max_sequence_length=16, clip_length=16, vocab_size=320, vae_out_gain=3.0, vae_groups=1),
    "bench": dict(image_size=64, num_layers=4, num_attention_heads=4, attention_head_dim=32, latent_channels=4,
                  vae_channels=16, clip_hidden=32, t5_dim=64, max_sequence_length=32, clip_length=77, vocab_size=512, vae_out_gain=1.0, vae_groups=4),
}


def build_tiny_sd3(size: str = "test", overrides: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Tiny random `StableDiffusion3Pipeline` components (offline): returns the components dict plus
    `image_size` and `max_sequence_length`. Weights are seeded, so the same preset gives the same model."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ...tiny import build_tokenizer

    p = tiny_preset(TINY_PRESETS, size, overrides or {}, "sd3")
    vae_factor, patch = 2, 2
    if p["image_size"] % (vae_factor * patch):
        raise ValueError(f"model.tiny_overrides.image_size={p['image_size']} must be a multiple of {vae_factor * patch}")
    latent = p["image_size"] // vae_factor
    inner = p["num_attention_heads"] * p["attention_head_dim"]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=patch, in_channels=p["latent_channels"], out_channels=p["latent_channels"],
            num_layers=p["num_layers"], attention_head_dim=p["attention_head_dim"],
            num_attention_heads=p["num_attention_heads"], caption_projection_dim=inner,
            joint_attention_dim=p["t5_dim"], pooled_projection_dim=2 * p["clip_hidden"],
            pos_embed_max_size=max(latent // patch, 8),
        )
        c = p["vae_channels"]
        vae = AutoencoderKL(
            sample_size=p["image_size"], in_channels=3, out_channels=3, latent_channels=p["latent_channels"],
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(c, c), layers_per_block=1, norm_num_groups=p["vae_groups"],
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        )
        # A random decoder ends in GroupNorm -> SiLU -> conv_out and gives washed-out grey images (pixel std ~0.15);
        # `vae_out_gain` scales conv_out so decoded pixels span the range as real images do (std ~0.5), which
        # gives pixel rewards room to move in the CPU demo.
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(p["vae_out_gain"])
        clip_cfg = CLIPTextConfig(
            bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=p["clip_hidden"],
            intermediate_size=2 * p["clip_hidden"], num_attention_heads=2, num_hidden_layers=2,
            vocab_size=p["vocab_size"], hidden_act="gelu", projection_dim=p["clip_hidden"], max_position_embeddings=p["clip_length"],
        )
        te1, te2 = CLIPTextModelWithProjection(clip_cfg), CLIPTextModelWithProjection(clip_cfg)
        te3 = T5EncoderModel(T5Config(vocab_size=p["vocab_size"], d_model=p["t5_dim"], d_kv=8, d_ff=2 * p["t5_dim"],
                                      num_layers=2, num_heads=p["t5_dim"] // 8, relative_attention_num_buckets=8,
                                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
    finally:
        torch.random.set_rng_state(state)
    # CLIP pools at the first EOS, so its tokenizer appends one; the pipeline pads CLIP to model_max_length
    tok77 = build_tokenizer(vocab_size=p["vocab_size"], model_max_length=p["clip_length"], append_eos=True)
    tok_t5 = build_tokenizer(vocab_size=p["vocab_size"], model_max_length=p["max_sequence_length"], append_eos=True)
    return dict(
        components=dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer, vae=vae,
                        text_encoder=te1, text_encoder_2=te2, text_encoder_3=te3, tokenizer=tok77, tokenizer_2=tok77,
                        tokenizer_3=tok_t5),
        image_size=p["image_size"],
        max_sequence_length=p["max_sequence_length"],
    )


class SD3Policy(FlowPolicy):
    """SD3 / SD3.5 (MMDiT) flow-matching policy. See the module docstring and FlowPolicy for behaviour."""

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_shift = 3.0
    default_image_size = 512

    def timestep_schedule_kwargs(self) -> dict[str, float]:
        # the SD3 pipeline's default schedule (Flow-GRPO samples with it): down to the shifted 1/1000, not 1/T
        kw = super().timestep_schedule_kwargs()
        return {**kw, "sigma_end": sde_math.sd3_sigma_end(kw.get("shift"))}
    max_sequence_length = 256  # T5 tokens (SD3's pipeline default)

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        from diffusers import StableDiffusion3Pipeline

        mcfg = cfg.model
        self.weight_dtype = resolve_dtype(mcfg.dtype)
        if mcfg.tiny:
            built = build_tiny_sd3(mcfg.tiny_size, dict(mcfg.tiny_overrides), seed=cfg.run.seed)
            pipe = StableDiffusion3Pipeline(**built["components"])
            self.image_size = mcfg.image_size or built["image_size"]
            self.max_sequence_length = built["max_sequence_length"]
        else:
            pipe = load_pipeline(StableDiffusion3Pipeline, mcfg.path, self.weight_dtype, mcfg.revision,
                                 "model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/",
                                 "stabilityai/stable-diffusion-3.5-medium", timestep_shift=cfg.rollout.timestep_shift)
        pipe.set_progress_bar_config(disable=True)
        # the checkpoint's own static shift (3.0 in every SD3 / SD3.5 release), as its pipeline samples with
        sc = pipe.scheduler.config
        if sc.get("use_dynamic_shifting") and not cfg.rollout.timestep_shift:
            raise ValueError(f"model.path='{mcfg.path}': its scheduler uses dynamic (resolution-dependent) shifting, which "
                             "the SD3 policy does not replicate; set rollout.timestep_shift to a static shift")
        self.default_shift = float(sc.get("shift") or 1.0)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
        # the pipeline object is kept (not as a submodule) for its encode_prompt; it shares our modules
        object.__setattr__(self, "_pipe", pipe)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        mult = self.vae_factor * self.transformer.config.patch_size
        if self.image_size % mult:
            raise ValueError(f"model.image_size={self.image_size} must be a multiple of {mult} (VAE x{self.vae_factor} "
                             f"times patch {self.transformer.config.patch_size})")
        for m in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            self.freeze(m)
        self.to(device)
        if mcfg.tiny and self.weight_dtype != torch.float32:  # real weights were loaded in weight_dtype already
            for m in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.transformer):
                move_module(m, device, self.weight_dtype)  # (in place: nn.Module.to returns the module)
        self.setup_trainable(self.transformer)
        if not self.uses_lora():
            # The last MMDiT block is context_pre_only: its text-query projection feeds only text outputs that
            # are discarded, so it never gets a gradient; leave it frozen instead of carrying dead optimizer state
            # (with SD3.5's RMS q/k norm, the norm of those queries as well).
            for blk in self.transformer.transformer_blocks:
                if getattr(blk, "context_pre_only", False) and getattr(blk.attn, "add_q_proj", None) is not None:
                    blk.attn.add_q_proj.requires_grad_(False)
                    if getattr(blk.attn, "norm_added_q", None) is not None:
                        blk.attn.norm_added_q.requires_grad_(False)
        if mcfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.eval()

    # ---- hooks ------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, ...]:
        s = self.image_size // self.vae_factor
        return (self.transformer.config.in_channels, s, s)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled": pooled}  # [B, 77 + L_t5, D], [B, 2 * clip_proj]

    def pipeline(self):
        """The diffusers `StableDiffusion3Pipeline` sharing this policy's modules (inference, `load_lora_weights`),
        as FLUX's and Qwen-Image's `pipeline()`."""
        return self._pipe

    def transformer_forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # the timestep stays fp32, as the SD3 pipeline passes it (in bf16 923.08 would become 924)
        dt = self.weight_dtype
        return self.transformer(
            hidden_states=latents.to(dt), encoder_hidden_states=cond["prompt_embeds"].to(dt),
            pooled_projections=cond["pooled"].to(dt), timestep=(sigma * 1000).float(), return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        z = latents.to(self.weight_dtype) / c.scaling_factor + c.shift_factor
        return (self.vae.decode(z, return_dict=False)[0].float() + 1) / 2

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        # the posterior mean, not a sample: SFT targets then do not depend on VAE noise
        z = self.vae.encode(images.to(self.weight_dtype) * 2 - 1).latent_dist.mean
        return (z.float() - c.shift_factor) * c.scaling_factor

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    def save_pretrained(self, path: str) -> None:
        """LoRA: `pytorch_lora_weights.safetensors` loadable with `StableDiffusion3Pipeline.load_lora_weights(path)`;
        full fine-tuning: a diffusers transformer directory at `path/transformer`."""
        os.makedirs(path, exist_ok=True)
        if self.uses_lora():
            from diffusers import StableDiffusion3Pipeline
            from peft.utils import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.transformer)
            # the LoRA config (r, alpha, targets) travels as safetensors metadata, so loading gets alpha/r right
            meta = self.transformer.peft_config["default"].to_dict()
            StableDiffusion3Pipeline.save_lora_weights(path, transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
        else:
            self.transformer.save_pretrained(os.path.join(path, "transformer"))
