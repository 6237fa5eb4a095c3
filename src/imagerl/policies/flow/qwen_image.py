"""Qwen-Image policy adapter: Qwen/Qwen-Image (20B MMDiT, and tiny random copies) for Flow-GRPO.

What is Qwen-Image-specific lives here as pure functions plus a thin `FlowPolicy` subclass:

* prompts: the Qwen2.5-VL-7B text encoder reads the prompt inside a fixed chat template ("Describe the
  image by detailing the color, shape, ..."); the last hidden states are kept, the first
  `drop_idx` tokens (the template's system part, 34 for the real tokenizer) are dropped, and rows are
  right-padded to the longest prompt of the batch with a 0/1 mask the transformer's joint attention uses;
* true CFG (the model is not guidance-distilled): v = v_u + s (v_c - v_u), then **rescaled per token** to
  the norm of the conditional velocity, v * ||v_c|| / ||v|| (over the channel dim, as the upstream
  pipeline does); `rollout.cfg_scale` is the pipeline's `true_cfg_scale` (4.0 in the model card) and the
  negative prompt is a single space, as in the model card's example;
* latents: 16-channel (tiny: 4) video-VAE latents with one frame, normalised per channel
  ((z - latents_mean) / latents_std), packed into 2x2 patches like FLUX; RoPE positions come from
  `img_shapes` = (1, h/2, w/2) per sample;
* timesteps: dynamic shift (mu linear in the token count between 256 and 8192 tokens, 0.5 -> 0.9) and the
  schedule is stretched so its last non-zero sigma is `shift_terminal` (0.02).

Departures from the upstream `QwenImagePipeline`: the SDE loop of `FlowPolicy` replaces the scheduler's
Euler step; prompt embeddings are computed once per distinct prompt; the text mask is always passed to the
transformer (the pipeline drops it when no row is padded), so a row's computation does not depend on
which other rows share its micro-batch. Text conditions of one rollout share one padded length, so
conditions of *different* rollouts must be re-padded before being concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...devices import resolve_dtype
from .base import FlowPolicy, load_pipeline, move_module, tiny_preset
from .flux import (
    check_image_size,
    scheduler_sigmas,
    pack_latents,
    save_transformer,
    unpack_latents,
)

# Scheduler config of Qwen/Qwen-Image (scheduler/scheduler_config.json)
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "time_shift_type": "exponential",
    "shift_terminal": 0.02,
}

# The text-encoder template of QwenImagePipeline; `drop_idx` tokens of it are removed from the states.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP_IDX = 34  # template tokens before the prompt, with the real Qwen2 tokenizer
NEGATIVE_PROMPT = " "  # the model card's default negative prompt
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline default (hard limit 1024)
DEFAULT_IMAGE_SIZE = 512  # RL at 512 px (the model's native 1328 px / 1024 px costs 4-7x more per step)
TEXT_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>")

#: Tiny presets (model.tiny_size); every key can be overridden through model.tiny_overrides.
QWEN_IMAGE_TINY_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 16 px, x2 VAE -> 8x8 latent -> 16 packed tokens
    "test": dict(
        image_size=16, vae_base_dim=8, vae_dim_mult=[1, 2], latent_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, axes_dims_rope=[8, 4, 4], text_dim=16, text_layers=1, max_sequence_length=64,
    ),
    "demo": dict(
        image_size=64, vae_base_dim=8, vae_dim_mult=[1, 2], latent_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, axes_dims_rope=[8, 4, 4], text_dim=32, text_layers=2, max_sequence_length=128,
    ),
    "bench": dict(
        image_size=128, vae_base_dim=8, vae_dim_mult=[1, 2], latent_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, axes_dims_rope=[8, 12, 12], text_dim=32, text_layers=2, max_sequence_length=128,
    ),
}


@dataclass
class QwenImageComponents:
    transformer: nn.Module  # QwenImageTransformer2DModel
    vae: nn.Module  # AutoencoderKLQwenImage
    text_encoder: nn.Module  # Qwen2_5_VLForConditionalGeneration (frozen, text path only)
    tokenizer: Any
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER_CONFIG))
    prompt_template: str = PROMPT_TEMPLATE
    drop_idx: int = PROMPT_TEMPLATE_DROP_IDX
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    default_image_size: int = DEFAULT_IMAGE_SIZE

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)


def template_drop_idx(tokenizer: Any, template: str = PROMPT_TEMPLATE) -> int:
    """Number of tokens the template puts before the prompt (what the real pipeline hard-codes as 34).

    Used for tiny tokenizers, whose token boundaries differ from Qwen2's."""
    prefix = template.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=False).input_ids)


def build_tiny_qwen_image(size: str = "test", overrides: dict[str, Any] | None = None, seed: int = 0) -> QwenImageComponents:
    """Tiny random Qwen-Image of the real classes (Qwen2_5_VLForConditionalGeneration,
    QwenImageTransformer2DModel, AutoencoderKLQwenImage), built offline and deterministically."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ...tiny import build_tokenizer

    p = tiny_preset(QWEN_IMAGE_TINY_PRESETS, size, dict(overrides or {}), "Qwen-Image")
    if sum(p["axes_dims_rope"]) != p["attention_head_dim"]:
        raise ValueError(
            f"model.tiny_overrides: sum(axes_dims_rope)={sum(p['axes_dims_rope'])} must equal "
            f"attention_head_dim={p['attention_head_dim']}"
        )
    n_down = len(p["vae_dim_mult"]) - 1
    if n_down < 1:
        raise ValueError("model.tiny_overrides.vae_dim_mult needs at least two entries (one downsampling)")
    scale = 2**n_down
    if p["image_size"] % (2 * scale):
        raise ValueError(f"model.tiny_overrides.image_size={p['image_size']} must be a multiple of {2 * scale}")
    tok = build_tokenizer(specials=TEXT_SPECIALS, model_max_length=4096)
    head_dim = p["text_dim"] // 2
    # mrope sections cover head_dim / 2 rotary frequencies (temporal, height, width)
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config={
                    "hidden_size": p["text_dim"], "intermediate_size": 2 * p["text_dim"], "num_hidden_layers": p["text_layers"],
                    "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tok),
                    "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                    "rope_parameters": {"mrope_section": mrope, "rope_type": "default", "rope_theta": 1e6},
                },
                vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                               "out_hidden_size": p["text_dim"]},
            )
        )
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * p["latent_channels"], out_channels=p["latent_channels"],
            num_layers=p["num_layers"], attention_head_dim=p["attention_head_dim"],
            num_attention_heads=p["num_attention_heads"], joint_attention_dim=p["text_dim"], guidance_embeds=False,
            axes_dims_rope=tuple(p["axes_dims_rope"]),
        )
        vae = AutoencoderKLQwenImage(
            base_dim=p["vae_base_dim"], z_dim=p["latent_channels"], dim_mult=list(p["vae_dim_mult"]), num_res_blocks=1,
            temperal_downsample=[False] * n_down,
            # non-trivial statistics (the real VAE has them), so that a test against the pipeline can tell the
            # latents normalisation from its inverse
            latents_mean=[0.1 * (i % 5) - 0.2 for i in range(p["latent_channels"])],
            latents_std=[0.8 + 0.1 * (i % 4) for i in range(p["latent_channels"])],
        )
    return QwenImageComponents(
        transformer=transformer, vae=vae, text_encoder=te, tokenizer=tok,
        scheduler_config=dict(QWEN_IMAGE_SCHEDULER_CONFIG), drop_idx=template_drop_idx(tok),
        max_sequence_length=int(p["max_sequence_length"]), default_image_size=int(p["image_size"]),
    )


def load_qwen_image(path: str, dtype: torch.dtype = torch.bfloat16, revision: str = "",
                    timestep_shift: float = 0.0) -> QwenImageComponents:
    """Load Qwen-Image from a local directory or hub id with `QwenImagePipeline.from_pretrained`."""
    from diffusers import QwenImagePipeline

    pipe = load_pipeline(QwenImagePipeline, path, dtype, revision,
                         "model_index.json, transformer/, vae/, text_encoder/, tokenizer/", "Qwen/Qwen-Image", timestep_shift)
    sched = {k: pipe.scheduler.config.get(k, v) for k, v in QWEN_IMAGE_SCHEDULER_CONFIG.items()}
    return QwenImageComponents(
        transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler_config=sched, prompt_template=pipe.prompt_template_encode,
        drop_idx=int(pipe.prompt_template_encode_start_idx), max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH,
        default_image_size=DEFAULT_IMAGE_SIZE,
    )


# --------------------------------------------------------------------------------------------------
# Prompt encoding
# --------------------------------------------------------------------------------------------------


@dataclass
class QwenPromptEmbeds:
    embeds_BTD: torch.Tensor  # [B, T, D] last hidden states of the prompt tokens, right-padded with zeros
    mask_BT: torch.Tensor  # [B, T] long, 1 = prompt token, 0 = padding


def encode_qwen_prompts(c: QwenImageComponents, prompts: list[str], device: torch.device) -> QwenPromptEmbeds:
    """Template -> Qwen2.5-VL last hidden states -> drop the template's first `drop_idx` tokens -> pad."""
    texts = [c.prompt_template.format(p) for p in prompts]
    tok = c.tokenizer(texts, max_length=c.max_sequence_length + c.drop_idx, padding=True, truncation=True,
                      return_tensors="pt")
    ids, am = tok.input_ids.to(device), tok.attention_mask.to(device)
    hidden = c.text_encoder(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states[-1]
    rows = [h[m.bool()][c.drop_idx:] for h, m in zip(hidden, am)]  # valid tokens of each row, template cut
    T = max(1, max(r.shape[0] for r in rows))
    emb = hidden.new_zeros(len(rows), T, hidden.shape[-1])
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=hidden.device)
    for i, r in enumerate(rows):
        emb[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return QwenPromptEmbeds(embeds_BTD=emb, mask_BT=mask)


def pad_text(embeds_BTD: torch.Tensor, mask_BT: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad text conditions to `length` tokens (zeros, mask 0)."""
    extra = length - embeds_BTD.shape[1]
    if extra <= 0:
        return embeds_BTD, mask_BT
    return F.pad(embeds_BTD, (0, 0, 0, extra)), F.pad(mask_BT, (0, extra))


# --------------------------------------------------------------------------------------------------
# Sigmas, CFG, transformer call, VAE
# --------------------------------------------------------------------------------------------------


def qwen_image_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int, timestep_shift: float = 0.0) -> torch.Tensor:
    """The sigma schedule [num_steps + 1] of Qwen-Image at `image_seq_len` packed tokens (see `scheduler_sigmas`)."""
    return scheduler_sigmas(scheduler_config, num_steps, image_seq_len, timestep_shift)


def norm_preserving_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: v_u + s (v_c - v_u), rescaled per token to the norm of v_c (last dim)."""
    comb = v_uncond + scale * (v_cond - v_uncond)
    return comb * (v_cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


def qwen_image_velocity(
    transformer: nn.Module, x_BLD: torch.Tensor, sigma_B: torch.Tensor, embeds_BTD: torch.Tensor, mask_BT: torch.Tensor,
    latent_hw: tuple[int, int],
) -> torch.Tensor:
    """One Qwen-Image transformer forward -> velocity [B, L, D]; sigma in [0, 1] is the model's timestep."""
    h, w = latent_hw
    return transformer(
        hidden_states=x_BLD,
        encoder_hidden_states=embeds_BTD,
        encoder_hidden_states_mask=mask_BT,
        timestep=(sigma_B * 1000).to(x_BLD.dtype) / 1000,  # the pipeline's rounding: t = 1000 sigma in the latents' dtype
        img_shapes=[[(1, h // 2, w // 2)]] * x_BLD.shape[0],
        return_dict=False,
    )[0]


def _latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = int(vae.config.z_dim)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32).view(1, z, 1, 1, 1)
    return mean, std


def decode_qwen_image_latents(vae: nn.Module, x_BLD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed normalised latents -> images [B, 3, H, W] in [0, 1]."""
    z = unpack_latents(x_BLD.float(), h, w).unsqueeze(2)  # [B, C, 1 frame, h, w]
    mean, std = _latent_stats(vae, z)
    z = z * std + mean
    img = vae.decode(z.to(next(vae.parameters()).dtype), return_dict=False)[0][:, :, 0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def encode_qwen_image_images(vae: nn.Module, images_B3HW: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> packed normalised latents [B, L, D] (posterior mode)."""
    x = (images_B3HW * 2 - 1).unsqueeze(2).to(next(vae.parameters()).dtype)
    z = vae.encode(x).latent_dist.mode().float()
    mean, std = _latent_stats(vae, z)
    return pack_latents(((z - mean) / std)[:, :, 0])


# --------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------

# Submodules of the LAST dual-stream block that only produce text-token outputs, which the model discards
# (only image tokens reach norm_out / proj_out). They can never receive a gradient.
_DEAD_TEXT_PATH = ("attn.add_q_proj.", "attn.norm_added_q.", "attn.to_add_out.", "txt_mlp.")


def freeze_dead_text_path(transformer: nn.Module) -> list[str]:
    """Take the last block's text-output-only parameters (and LoRA on them) out of training.

    Why: they get no gradient, so DDP (without find_unused_parameters) would fail on them, weight decay
    would shrink them for nothing, and "every trainable parameter changes" could not hold. Returns the
    names frozen."""
    last = len(transformer.transformer_blocks) - 1
    prefix = f"transformer_blocks.{last}."
    frozen = []
    for name, p in transformer.named_parameters():
        if p.requires_grad and name.startswith(prefix) and any(k in name[len(prefix):] for k in _DEAD_TEXT_PATH):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen



class QwenImagePolicy(FlowPolicy):
    """Qwen-Image adapter (`model.family: qwen_image`): trains the QwenImageTransformer2DModel (LoRA or full)
    with the Qwen2.5-VL text encoder and the VAE frozen; true CFG with per-token norm rescaling."""

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_image_size = DEFAULT_IMAGE_SIZE

    def __init__(self, cfg, device: torch.device):
        super().__init__(cfg, device)
        m = cfg.model
        dtype = resolve_dtype(m.dtype)
        if m.tiny:
            comps = build_tiny_qwen_image(m.tiny_size, m.tiny_overrides, seed=cfg.run.seed)
            self.image_size = m.image_size or comps.default_image_size
        else:
            comps = load_qwen_image(m.path, dtype, m.revision, cfg.rollout.timestep_shift)
        self.comps = comps
        self.weight_dtype = dtype
        cast = dtype if m.tiny else None  # from_pretrained already loaded `dtype`
        self.transformer = move_module(comps.transformer, device, cast)
        self.vae = move_module(comps.vae, device, cast)
        self.text_encoder = move_module(comps.text_encoder, device, cast)
        self.freeze(self.vae)
        self.freeze(self.text_encoder)
        if m.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.setup_trainable(self.transformer)
        freeze_dead_text_path(self.transformer)
        self.transformer.eval()
        check_image_size(self.image_size, 2 * comps.vae_scale_factor, "Qwen-Image")
        f = comps.vae_scale_factor
        self.latent_hw = (self.image_size // f, self.image_size // f)

    # ---- hooks ------------------------------------------------------------------------------------
    def trainable_module(self) -> nn.Module:
        return self.transformer

    def latent_shape(self) -> tuple[int, ...]:
        h, w = self.latent_hw
        return ((h // 2) * (w // 2), 4 * self.comps.latent_channels)

    def sigma_schedule(self, num_steps: int) -> torch.Tensor:
        return qwen_image_sigmas(self.comps.scheduler_config, num_steps, self.latent_shape()[0], self.cfg.rollout.timestep_shift)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        e = encode_qwen_prompts(self.comps, prompts, self.device)
        return {"embeds": e.embeds_BTD, "mask": e.mask_BT}

    def negative_cond(self) -> dict[str, torch.Tensor]:
        if self._neg_cond is None:
            self._neg_cond = self.encode_prompts([NEGATIVE_PROMPT])
        return self._neg_cond

    def predict_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                         guidance: float) -> torch.Tensor:
        """True CFG with norm rescaling; cond and uncond rows in one forward (text padded to one length)."""
        if guidance <= 1.0:
            return self.transformer_forward(latents, sigma, cond)
        n = latents.shape[0]
        neg = self.negative_cond()
        T = max(cond["embeds"].shape[1], neg["embeds"].shape[1])
        e_c, m_c = pad_text(cond["embeds"], cond["mask"], T)
        e_u, m_u = pad_text(neg["embeds"], neg["mask"], T)
        both = {
            "embeds": torch.cat([e_c, e_u.expand(n, -1, -1).to(e_c.dtype)], 0),
            "mask": torch.cat([m_c, m_u.expand(n, -1)], 0),
        }
        v2 = self.transformer_forward(torch.cat([latents, latents], 0), torch.cat([sigma, sigma], 0), both)
        return norm_preserving_cfg(v2[:n].float(), v2[n:].float(), guidance)

    def transformer_forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dt = self.weight_dtype
        return qwen_image_velocity(self.transformer, latents.to(dt), sigma, cond["embeds"].to(dt), cond["mask"], self.latent_hw)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_qwen_image_latents(self.vae, latents, *self.latent_hw)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode_qwen_image_images(self.vae, images)

    def pipeline(self):
        """A diffusers `QwenImagePipeline` sharing this policy's modules (inference, `load_lora_weights`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        c = self.comps
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in c.scheduler_config.items() if v is not None}),
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=c.tokenizer, transformer=self.transformer,
        )
        pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx = c.prompt_template, c.drop_idx
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_pretrained(self, path: str) -> None:
        """LoRA: `pytorch_lora_weights.safetensors` loadable with `QwenImagePipeline.load_lora_weights(path)`;
        full fine-tuning: a diffusers transformer directory at `path/transformer`."""
        save_transformer(self.transformer, path, self.uses_lora(), "QwenImagePipeline")

