"""Janus-Pro as an RL policy: transformers' `JanusForConditionalGeneration` with our own image-token sampler.

Rollout: each prompt is formatted as Janus-Pro formats text-to-image prompts
(``<bos><|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>``), the unconditional row is the same
sequence with every token except BOS and BOI replaced by pad (as Janus and transformers do), and both rows
run in one batched forward per step with a pre-allocated KV cache (`sampling.cfg_decode`). The G samples
of a prompt are rows of the same batch. Image tokens are decoded to pixels by the frozen VQ model.

log_prob: one teacher-forced forward of cond + uncond rows through the language model and the image
generation head (not `lm_head`), CFG mix, divide by the sampling temperature, the same top-k/top-p
filter, log-softmax, gather. It reproduces the rollout's `old_logp` (ratio 1 at the first inner step).

Departures from the paper / reference code, and why:
- CFG is mixed before the generation head's last linear layer (`vision_head`). The head is
  proj_out -> GELU -> vision_head, and a linear map commutes with the affine CFG mix, so this equals
  mixing logits exactly (up to float rounding) while running the vocabulary projection on half the rows.
  Rollout and log_prob share the function, so their numerics agree.
- Positions of left-padded prompts skip the padding (transformers' generate counts pad slots), so a
  sample does not depend on the other prompts of its batch.
- Janus-Pro-R1 / T2I-R1 style training scores tokens with the true sampling distribution here; a
  published system trained on CFG/scale logits while sampling at temperature 1 (a mismatch we avoid).

Tiny models (`build_tiny_janus`) are the real classes with small configs, built offline. Their VQ decoder
is *painted* (`paint_palette_decoder`): resnet and attention blocks are set to identity and the output
layers map each code to one of 8 saturated colours over its patch, so a colour/position reward is
learnable by a tiny model; a random VQ decoder renders nearly the same grey for every code.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...config import Config
from ...tiny import build_tokenizer
from ...types import LogProbOutput, PromptBatch, Rollout
from ...devices import resolve_dtype
from ..base import Policy, fsdp_units, hub_kwargs, not_downloaded_error, sum_sharded_gradients
from .sampling import (
    FastLlamaDecoder,
    SamplingParams,
    causal_padding_mask,
    cfg_decode,
    cfg_mix,
    gather_logprobs,
    positions_from_valid,
    row_uniforms,
    sampling_logits,
)

JANUS_SPECIALS = (
    "<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>",
)
BOI_TOKEN = "<begin_of_image>"
USER_ROLE, ASSISTANT_ROLE = "<|User|>", "<|Assistant|>"

# Architecture knobs of the tiny presets. grid = image tokens per side; the VQ decoder upsamples by
# 2 ** (len(vq_channel_multiplier) - 1), so image px = grid * that.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: 4x4 tokens, 16 px, ~60k parameters
    "test": dict(grid=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                 text_vocab_size=320, codebook_size=32, vq_embed_dim=8, vq_channels=32,
                 vq_channel_multiplier=[1, 1, 1], vq_res_blocks=1, vision_hidden_size=32, palette_decoder=True, seed=0,
                 init_std=0.02),
    # built-in demo: 8x8 tokens, 32 px; learns a colour/position rule on 2 CPU cores. init_std 0.1 (not the
    # 0.02 of large models): at hidden 64 the 0.02 init gives near-zero logits that GRPO moves too slowly
    "demo": dict(grid=8, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                 text_vocab_size=512, codebook_size=64, vq_embed_dim=8, vq_channels=32,
                 vq_channel_multiplier=[1, 1, 1], vq_res_blocks=1, vision_hidden_size=32, palette_decoder=True, seed=0,
                 init_std=0.1),
    # benchmark: 16x16 = 256 tokens, 4 layers of hidden 256 (head dim 64), 1024 codes
    "bench": dict(grid=16, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=4,
                  text_vocab_size=512, codebook_size=1024, vq_embed_dim=8, vq_channels=32,
                  vq_channel_multiplier=[1, 1], vq_res_blocks=1, vision_hidden_size=32, palette_decoder=True, seed=0,
                  init_std=0.02),
}
_EXTRA_OVERRIDES = ("image_size",)

# The 8 corners of the RGB cube, in the order the painted decoder uses (code c -> PALETTE[c % 8]).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1),
)


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def tiny_spec(size: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved architecture knobs of a tiny preset plus `model.tiny_overrides` (validated)."""
    if size not in TINY_PRESETS:
        raise ValueError(f"model.tiny_size='{size}' is not a Janus tiny preset; choose one of {', '.join(TINY_PRESETS)}")
    spec = dict(TINY_PRESETS[size])
    for k, v in (overrides or {}).items():
        if k not in spec and k not in _EXTRA_OVERRIDES:
            valid = ", ".join(sorted([*spec, *_EXTRA_OVERRIDES]))
            raise ValueError(f"model.tiny_overrides.{k} is not a Janus tiny knob. Valid knobs: {valid}")
        spec[k] = v
    up = 2 ** (len(spec["vq_channel_multiplier"]) - 1)
    if spec.get("image_size"):
        if spec["image_size"] % up:
            raise ValueError(
                f"model.image_size={spec['image_size']} must be a multiple of the tiny VQ upsampling factor {up} "
                f"(len(vq_channel_multiplier)={len(spec['vq_channel_multiplier'])})"
            )
        spec["grid"] = spec["image_size"] // up
    spec["image_size"] = spec["grid"] * up
    if spec["vq_channels"] % 32:
        raise ValueError(f"model.tiny_overrides.vq_channels={spec['vq_channels']} must be a multiple of 32 (GroupNorm(32))")
    if spec["hidden_size"] % spec["num_heads"]:
        raise ValueError("model.tiny_overrides: hidden_size must be divisible by num_heads")
    return spec


def build_tiny_janus(size: str = "test", overrides: dict[str, Any] | None = None):
    """A tiny random-weight `JanusForConditionalGeneration` and its tokenizer, built offline.

    Deterministic: the same (size, overrides) give the same weights (seeded, caller's RNG untouched).
    Returns (model in eval mode, tokenizer)."""
    from transformers import (
        GenerationConfig,
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    spec = tiny_spec(size, overrides)
    tok = _janus_tokenizer(build_tokenizer(vocab_size=int(spec["text_vocab_size"]), specials=JANUS_SPECIALS))
    ids = {s: tok.convert_tokens_to_ids(s) for s in JANUS_SPECIALS}
    grid, h = int(spec["grid"]), int(spec["hidden_size"])
    text_config = LlamaConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=int(spec["intermediate_size"]),
        num_hidden_layers=int(spec["num_layers"]), num_attention_heads=int(spec["num_heads"]),
        num_key_value_heads=int(spec["num_kv_heads"]), max_position_embeddings=max(1024, 2 * grid * grid + 256),
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], tie_word_embeddings=False,
        initializer_range=float(spec["init_std"]),
    )
    vision_config = JanusVisionConfig(
        hidden_size=int(spec["vision_hidden_size"]), num_hidden_layers=1, num_attention_heads=2,
        image_size=16 * grid, patch_size=16, projection_dim=h, num_image_tokens=grid * grid, mlp_ratio=2.0,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=int(spec["vq_embed_dim"]), num_embeddings=int(spec["codebook_size"]),
        latent_channels=int(spec["vq_channels"]), base_channels=int(spec["vq_channels"]),
        channel_multiplier=list(spec["vq_channel_multiplier"]), num_res_blocks=int(spec["vq_res_blocks"]),
        projection_dim=h, image_token_embed_dim=h, num_hidden_layers=2,
    )
    config = JanusConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), vq_config=vq_config.to_dict(),
        image_token_id=ids["<image>"], initializer_range=float(spec["init_std"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["seed"]))
        model = JanusForConditionalGeneration(config).eval()
    if spec["palette_decoder"]:
        paint_palette_decoder(model.model.vqmodel)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
        generation_kwargs={"boi_token_id": ids[BOI_TOKEN]},
    )
    return model, tok


def _janus_tokenizer(tok):
    """The tiny tokenizer with the attributes transformers' `JanusProcessor` reads (image_token, boi_token,
    eoi_token: tokens it already holds, so no id changes), making a tiny export loadable by the processor too.
    A new wrapper over the same vocabulary: `build_tokenizer`'s cached object is not mutated."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", model_max_length=tok.model_max_length,
        extra_special_tokens={"image_token": "<image>", "boi_token": BOI_TOKEN, "eoi_token": "<end_of_image>"},
    )


def _tiny_processor(model, tokenizer):
    """A `JanusProcessor` for a tiny model: its tokenizer and an image processor at the vision tower's size
    (the PIL one: no torchvision here)."""
    from transformers import JanusProcessor

    try:
        from transformers import JanusImageProcessorPil as ImageProcessor
    except ImportError:  # (transformers releases before the PIL/torchvision split)
        from transformers import JanusImageProcessor as ImageProcessor
    vc = model.config.vision_config
    side = int(vc.image_size)
    return JanusProcessor(image_processor=ImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer,
                          num_image_tokens=(side // int(vc.patch_size)) ** 2)  # (its default, 576, is Janus-Pro's)


@torch.no_grad()
def paint_palette_decoder(vq: nn.Module, gain: float = 1000.0) -> None:
    """Set a Janus VQ model's decoder weights so that code c renders PALETTE[c % 8] over its patch.

    The blocks become identities (zero last conv of every resnet block, zero attention output projection,
    identity conv kernels), the codebook is one-hot over 8 colour channels, and the output GroupNorm (one
    channel per group, i.e. a per-channel spatial normalisation) is followed by a large gain so that a
    colour present at a pixel is strongly positive there and near -inf elsewhere; `conv_out` then maps
    channel k to PALETTE[k] in [-1, 1]. A per-channel spatial normalisation would render a single-colour
    image black (a constant channel normalises to 0); a 1e-3 neighbourhood term in `conv_in` keeps such an
    image coloured except for a dark one-token frame. Needs channel_multiplier all 1."""
    cfg = vq.config
    if any(m != 1 for m in cfg.channel_multiplier) or cfg.latent_channels != cfg.base_channels:
        raise ValueError("paint_palette_decoder needs vq channel_multiplier all 1 and latent_channels == base_channels")
    C, E, K = cfg.base_channels, cfg.embed_dim, cfg.num_embeddings
    if E < len(PALETTE) or C < len(PALETTE):
        raise ValueError(f"paint_palette_decoder needs vq embed_dim and channels >= {len(PALETTE)}")

    def identity_conv(conv: nn.Conv2d) -> None:
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        n = min(conv.in_channels, conv.out_channels)
        conv.weight[torch.arange(n), torch.arange(n), k, k] = 1.0
        conv.bias.zero_()

    dec = vq.decoder
    code_colour = torch.arange(K) % len(PALETTE)
    vq.quantize.embedding.weight.zero_()
    vq.quantize.embedding.weight[torch.arange(K), code_colour] = 1.0
    identity_conv(vq.post_quant_conv)
    identity_conv(dec.conv_in)
    # A tiny same-colour neighbourhood term: zero padding makes border tokens differ by O(eps), so a channel
    # is never spatially constant and a single-colour image keeps its colour (inside a one-token dark frame)
    # instead of being normalised away to black by norm_out.
    n = len(PALETTE)
    dec.conv_in.weight[torch.arange(n), torch.arange(n)] += 1e-3
    for m in dec.modules():
        if type(m).__name__ == "JanusVQVAEResnetBlock":
            m.conv2.weight.zero_()
            m.conv2.bias.zero_()
        elif type(m).__name__ == "JanusVQVAEAttnBlock":
            m.proj_out.weight.zero_()
            m.proj_out.bias.zero_()
        elif type(m).__name__ == "JanusVQVAEConvUpsample":
            identity_conv(m.conv)
    dec.norm_out.weight.zero_()
    dec.norm_out.bias.zero_()
    dec.norm_out.weight[: len(PALETTE)] = gain
    dec.conv_out.weight.zero_()
    k = dec.conv_out.kernel_size[0] // 2
    for c, rgb in enumerate(PALETTE):
        dec.conv_out.weight[:, c, k, k] = 2.0 * torch.tensor(rgb, dtype=torch.float32)
    dec.conv_out.bias.fill_(-1.0)


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodedPrompts:
    ids: torch.Tensor  # [B, P] long, left-padded conditional prompt ids
    valid: torch.Tensor  # [B, P] bool, False on left padding


class JanusPolicy(Policy):
    """Janus-Pro (transformers `JanusForConditionalGeneration`) as an autoregressive image-token policy."""

    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    # the flow SDE settings: an image-token model samples its tokens one by one, with no timesteps
    unused_settings = (
        "rollout.num_steps", "rollout.sde", "rollout.noise_level", "rollout.sde_window", "rollout.sde_window_range",
        "rollout.shared_noise", "rollout.timestep_shift", "rollout.cfg_in_training", "rollout.eval_num_steps",
        "algorithm.timestep_fraction", "algorithm.timestep_selection", "algorithm.log_prob")
    #: full fine-tune default: these parts of `JanusModel` are trained (VQ model, vision encoder, lm_head frozen)
    full_ft_modules = ("language_model", "generation_embeddings", "generation_aligner", "generation_head")
    #: roll out with `FastLlamaDecoder` (a lean replica of the Llama stack); False = transformers modules
    use_fast_decoder: bool = True
    #: tabulate the image-token embedding when the codebook has at most this many times the tokens sampled
    EMBED_TABLE_FACTOR = 4

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__(cfg, device)
        m = cfg.model
        if device.type == "mps":  # (before loading 7B weights onto it)
            raise ValueError("run.device=mps: the Janus sampler draws tokens by an fp64 inverse CDF (exact log-probs for "
                             "the ratio), and MPS has no float64; use run.device=cpu or a CUDA GPU")
        if m.tiny:
            # tiny presets keep their own resolution (model.image_size describes the real checkpoint, e.g. 384
            # in a recipe); model.tiny_overrides.image_size changes it
            model, tokenizer = build_tiny_janus(m.tiny_size, dict(m.tiny_overrides))
        else:
            model, tokenizer = load_janus(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                          dtype=resolve_dtype(m.dtype))
        self.model = model.to(device=device, dtype=resolve_dtype(m.dtype)).eval()
        self.tokenizer = tokenizer
        self.grid = int(self.model.config.vq_config.num_patches)
        self.num_image_tokens = self.grid * self.grid
        if not m.tiny and m.image_size:
            native = int(self.model.config.vision_config.image_size)
            if m.image_size != native:
                raise ValueError(
                    f"model.image_size={m.image_size} but the checkpoint at {m.path} generates {native} px "
                    f"({self.num_image_tokens} tokens); Janus cannot change resolution without retraining. "
                    f"Set model.image_size={native} or 0"
                )
        self._resolve_special_ids()
        self.params = self._sampling_params(eval_mode=False)
        # rollout.cuda_graph: the fixed-shape decode step (`cfg_decode(static=...)`), captured as a CUDA graph on
        # a GPU; elsewhere the same step runs eagerly, so a CPU smoke test of a GPU recipe runs the same code
        # (null, the default: on for CUDA, where it measured 2.4x to 7.6x faster than step-by-step decoding on an
        # H100, benchmarks/ar_rollout.md; off on a CPU, where attending over the whole buffer is slower)
        graph = cfg.rollout.cuda_graph if cfg.rollout.cuda_graph is not None else device.type == "cuda"
        self.decode_static = ("graph" if device.type == "cuda" else "eager") if graph else ""
        self._setup_trainable()
        if m.gradient_checkpointing:
            self._base_lm().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    # ---- construction helpers -------------------------------------------------------------------
    def _resolve_special_ids(self) -> None:
        tok = self.tokenizer
        gk = dict(getattr(self.model.generation_config, "generation_kwargs", None) or {})
        boi = gk.get("boi_token_id")
        if boi is None:
            boi = tok.convert_tokens_to_ids(BOI_TOKEN)
        unk = tok.unk_token_id
        if boi is None or (unk is not None and boi == unk):
            raise ValueError(f"the tokenizer at model.path has no '{BOI_TOKEN}' token; is it a Janus(-Pro) checkpoint?")
        tc = self.model.config.text_config
        self.boi_id = int(boi)
        self.bos_id = int(tok.bos_token_id if tok.bos_token_id is not None else tc.bos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tc.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        if pad is None:
            raise ValueError("the Janus tokenizer/config defines no pad token id (needed for the unconditional CFG row)")
        self.pad_id = int(pad)

    def _sampling_params(self, eval_mode: bool) -> SamplingParams:
        r = self.cfg.rollout
        scale = r.cfg_scale
        if eval_mode and r.eval_cfg_scale > 0:
            scale = r.eval_cfg_scale
        return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, cfg_scale=scale)

    def _base_lm(self) -> nn.Module:
        """The Llama model itself (inside the peft wrapper when LoRA is on)."""
        lm = self.model.model.language_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    def _setup_trainable(self) -> None:
        self.model.requires_grad_(False)
        m = self.cfg.model
        if m.lora.enabled:
            from peft import LoraConfig, get_peft_model

            targets = list(m.lora.target_modules) or list(self.default_lora_targets)
            lora_cfg = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout, target_modules=targets)
            try:
                with warnings.catch_warnings():  # (peft reads transformers' deprecated is_gradient_checkpointing)
                    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
                    peft_lm = get_peft_model(self.model.model.language_model, lora_cfg)
            except ValueError as e:
                raise ValueError(f"model.lora.target_modules={targets}: {e}") from e
            self.model.model.language_model = peft_lm
            train_mod: nn.Module = peft_lm
        else:
            jm = self.model.model
            container = nn.ModuleDict({name: getattr(jm, name) for name in self.full_ft_modules})
            names = [n for n, _ in container.named_parameters()]
            wanted = list(m.trainable)
            chosen = [n for n in names if not wanted or any(w in n for w in wanted)]
            if not chosen:
                raise ValueError(
                    f"model.trainable={wanted} matches no parameter of the Janus language model / generation head; "
                    f"names look like {names[:3]}"
                )
            chosen_set = set(chosen)
            for n, p in container.named_parameters():
                p.requires_grad_(n in chosen_set)
            train_mod = container
        # a plain attribute, not a registered child: the parameters already belong to self.model
        object.__setattr__(self, "_train_mod", train_mod)

    def trainable_module(self) -> nn.Module:
        return self._train_mod

    # ---- sharding (dist.strategy=fsdp2) -------------------------------------------------------------
    def shard(self, mesh) -> None:
        """FSDP2 over the trained modules. FSDP2 gathers a unit's parameters in that unit's own forward
        hook, so every module this policy calls directly is its own unit: each decoder layer, the token
        embedding, the language model (final norm; the peft wrapper with LoRA) and, for full fine-tuning,
        the image-token embedding, the aligner and the generation head's two linear layers (called
        separately: CFG is mixed between them). The rollout gathers all units once (`_gathered`): the lean
        decoder reads weights directly. Frozen parts outside the trained module (VQ model, vision encoder,
        and with LoRA the generation head) stay replicated.

        The sharded weights must be fp32 (sharded fp32 master weights; `run.dtype=bf16` gives bf16 compute):
        `model.dtype=fp32`, or for full fine-tuning `model.trained_dtype=fp32`, which leaves the frozen VQ model
        and vision encoder (never sharded) in bf16. The gradient divide factor is 1: the loss weights are
        already normalised by the global batch."""
        from torch.distributed.fsdp import fully_shard

        lm = self._base_lm()
        units: list[nn.Module] = [*lm.layers, lm.embed_tokens]
        if not self.uses_lora():
            jm = self.model.model
            units += [jm.generation_embeddings, jm.generation_aligner, jm.generation_head.proj_out,
                      jm.generation_head.vision_head]
        units.append(self.model.model.language_model)
        if any(p.dtype != torch.float32 for u in units for p in u.parameters()):
            raise NotImplementedError(
                "dist.strategy=fsdp2 for Janus needs fp32 sharded weights: model.dtype=fp32, or model.trained_dtype=fp32 "
                "for full fine-tuning (with run.dtype=bf16 for bf16 compute under autocast); or dist.strategy=ddp for "
                "bf16 weights"
            )
        # reshard_after_forward explicit (not the root/non-root default): `_gathered` restores exactly this
        for u in units:
            fully_shard(u, mesh=mesh, reshard_after_forward=True)
        sum_sharded_gradients(self.model)
        # Full fine-tuning: the generation head's Linear units and the aligner return views of their matmul outputs
        # ([N, T, V] from [N*T, V]), and FSDP2 warns on every training forward that an in-place op on such a view
        # would skip its pre-backward hook. This policy never modifies them in place (the two-process tests compare
        # gradients and weights against one process), so that warning is silenced for those units' classes (not the
        # decoder layers'). (A process-wide filter: FSDP2 emits it from a hook, outside any call of ours.)
        if not self.uses_lora():
            jm = self.model.model
            heads = [jm.generation_aligner, jm.generation_head.proj_out, jm.generation_head.vision_head]
            names = "|".join(sorted({type(u).__name__ for u in heads}))
            warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \(({names})\) returned a view tensor",
                                    category=UserWarning)
        # FSDP2 picks the root of a unit tree at the first forward, and the policy's first call into the
        # language model's tree is the token embedding (a child unit), which would then claim the root.
        # Initialise the real root now (no public API for this as of torch 2.13).
        self.model.model.language_model._get_fsdp_state()._lazy_init()

    @contextlib.contextmanager
    def _gathered(self, units: list[nn.Module]) -> Iterator[None]:
        """All FSDP2 units unsharded for the duration (one all-gather each; module calls inside neither
        gather nor reshard again, so ranks need not make the same calls)."""
        if not units:
            yield
            return
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
            u.unshard()
        try:
            yield
        finally:
            for u in units:
                u.reshard()
                u.set_reshard_after_forward(True, recurse=False)

    # ---- prompts ---------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """Janus-Pro's text-to-image format (DeepSeek SFT template, empty system prompt, image start tag)."""
        return f"{USER_ROLE}: {prompt}\n\n{ASSISTANT_ROLE}:{BOI_TOKEN}"

    def encode_prompts(self, prompts: list[str]) -> EncodedPrompts:
        """Tokenise and left-pad; BOS is prepended explicitly so every tokenizer gives the same layout."""
        rows = []
        for p in prompts:
            ids = self.tokenizer(self.format_prompt(p), add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] != self.boi_id:
                raise ValueError(f"prompt {p!r} did not tokenise to end with {BOI_TOKEN} (tokenizer mismatch?)")
            rows.append([self.bos_id, *ids])
        P = max(len(r) for r in rows)
        ids_BP = torch.full((len(rows), P), self.pad_id, dtype=torch.long)
        valid_BP = torch.zeros(len(rows), P, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids_BP[i, P - len(r):] = torch.tensor(r)
            valid_BP[i, P - len(r):] = True
        return EncodedPrompts(ids_BP.to(self.device), valid_BP.to(self.device))

    def uncond_ids(self, ids_BP: torch.Tensor) -> torch.Tensor:
        """The unconditional prompt: every token except BOS and BOI replaced by pad (Janus' CFG)."""
        keep = (ids_BP == self.bos_id) | (ids_BP == self.boi_id)
        return torch.where(keep, ids_BP, torch.full_like(ids_BP, self.pad_id))

    # ---- model pieces shared by rollout and log_prob ---------------------------------------------
    def _lm_forward(self, embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache=None) -> torch.Tensor:
        """The transformers forward of the language model with an explicit 4-D mask (which makes it skip
        its own mask construction). mask None = no padding."""
        if mask is None:
            R, L = embeds.shape[:2]
            past = cache.get_seq_length(0) if cache is not None else 0
            if L > 1:
                mask = causal_padding_mask(torch.ones(R, L, dtype=torch.bool, device=embeds.device))
                if past:
                    mask = torch.cat([mask.new_ones(R, 1, L, past), mask], -1)
            else:
                mask = torch.ones(R, 1, 1, past + 1, dtype=torch.bool, device=embeds.device)
        out = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state

    def _guided_logits(self, hidden: torch.Tensor, scale: float) -> torch.Tensor:
        """CFG-combined logits from hidden [R, ..., D] with rows [cond..., uncond...] -> [R/2, ..., V].

        Mixes after proj_out+GELU and before the final linear `vision_head` (exactly equivalent, see the
        module docstring)."""
        head = self.model.model.generation_head
        # the mix and the vocabulary projection run in fp32 even under bf16 autocast: the guidance scale
        # amplifies rounding of (cond - uncond), and sampling/scoring should see the same logits
        a = head.activation_fn(head.proj_out(hidden)).float()
        if scale != 1.0:
            n = a.shape[0] // 2
            a = cfg_mix(a[:n], a[n:], scale)
        lin = head.vision_head
        # leave autocast only when it is on (building the context every decode step costs ~1% of a step)
        autocast = torch.is_autocast_enabled(a.device.type)
        with torch.autocast(a.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if lin.weight.dtype == a.dtype:
                return lin(a)  # a module call: under FSDP2 the unit's forward hook gathers its weight
            w, b = lin.weight, lin.bias
            return torch.nn.functional.linear(a, w.float(), None if b is None else b.float())

    def _image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def _text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        return self._base_lm().get_input_embeddings()(ids)

    def _cond_uncond(self, x: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return torch.cat([x, x], 0) if params.uses_cfg else x

    # ---- sampling -------------------------------------------------------------------------------
    def rollout(
        self,
        batch: PromptBatch,
        group_size: int,
        generator: torch.Generator,
        group_id_offset: int = 0,
        eval_mode: bool = False,
    ) -> Rollout:
        """B prompts -> N = B*G samples (prompt-major). `eval_mode` uses rollout.eval_cfg_scale when set;
        sampling stays stochastic (greedy Janus images degenerate) and reproducible from `generator`.
        Each row draws from its own stream (`row_generators`), so rollout.micro_batch_size and the number
        of processes do not change the samples; each decoded micro-batch is handed to `emit_chunk`."""
        B, G = len(batch), group_size
        N = B * G
        params = self._sampling_params(eval_mode)
        enc = self.encode_prompts(batch.prompts)
        ids_NP = enc.ids.repeat_interleave(G, 0)
        valid_NP = enc.valid.repeat_interleave(G, 0)
        group_ids_N = group_id_offset + torch.arange(B).repeat_interleave(G)
        # one random stream per row (keyed by global group id): samples do not depend on batching
        u_NT = row_uniforms(self.row_generators(generator, group_ids_N, G), self.num_image_tokens, self.device)
        mb = self.cfg.rollout.micro_batch_size or N
        tokens, logps, images = [], [], []
        units = fsdp_units(self.model)
        # Sharded (FSDP2): gather every unit once for the whole rollout (the lean decoder reads weights
        # directly) and sample under no_grad: FSDP reuses its gathered buffers in training, which must not
        # be inference tensors.
        with self._gathered(units), (torch.no_grad() if units else torch.inference_mode()):
            # the weights do not change during a rollout: prepare the decoder and embeddings once for all
            # micro-batches
            parts = self._sampler_parts(params, N)
            for s in range(0, N, mb):
                out = self.sample_tokens(ids_NP[s:s + mb], valid_NP[s:s + mb], params, u_NT[s:s + mb], parts)
                tokens.append(out.tokens)
                logps.append(out.logp)
                images.append(self.decode_images(out.tokens))
                self.emit_chunk(s, s + out.tokens.shape[0], images[-1])
        # clone outside inference mode: replay tensors are later used in autograd-enabled forwards
        tokens_NT = torch.cat(tokens).clone()
        logp_NT = torch.cat(logps).clone()
        images_N3HW = torch.cat(images).clone()
        rep = lambda xs: [x for x in xs for _ in range(G)]  # noqa: E731
        return Rollout(
            images=images_N3HW,
            old_logp=logp_NT,
            mask=torch.ones_like(tokens_NT, dtype=torch.bool),
            group_ids=group_ids_N,
            prompts=rep(batch.prompts),
            metadata=[dict(m) for m in rep(batch.metadata)],
            replay={"prompt_ids": ids_NP.clone(), "prompt_mask": valid_NP.clone(), "image_tokens": tokens_NT,
                    "sampling": params},
            source_images=rep(batch.source_images) if batch.source_images is not None else None,
            dataset_names=rep(batch.dataset_names) if batch.dataset_names is not None else None,
        )

    def _sampler_parts(self, params: SamplingParams, num_rows: int) -> tuple[FastLlamaDecoder | None, Callable]:
        """What sampling `num_rows` images needs from the current weights: the lean decoder (None = the
        transformers forward) and the image-token embedding function (tokens [B] -> inputs [R, 1, D])."""
        fast = FastLlamaDecoder.build(self._base_lm()) if self.use_fast_decoder else None
        if fast is None and self.decode_static and self.cfg.rollout.cuda_graph:  # (not for the CUDA default, null)
            warnings.warn(f"rollout.cuda_graph=true has no effect on this language model "
                          f"({type(self._base_lm()).__name__}): the fixed-shape step needs the lean Llama decoder", stacklevel=2)
        # image-token inputs in the text embeddings' dtype, as `log_prob` builds its sequence: under autocast the
        # aligner MLP returns bf16 while the (never autocast) text embeddings stay fp32, and decoding from bf16
        # inputs would make the rollout a different function from the training forward
        text_dtype = self._base_lm().get_input_embeddings().weight.dtype
        embed = lambda tok_B: self._cond_uncond(self._image_embeds(tok_B[:, None]), params).to(text_dtype)  # noqa: E731
        V = self.model.config.vq_config.num_embeddings
        if fast is not None and V <= self.EMBED_TABLE_FACTOR * num_rows * self.num_image_tokens:
            # The image-token embedding (codebook lookup -> 2-layer aligner MLP) is a per-token function:
            # tabulate it for all V codes in one GEMM instead of two tiny GEMMs + GELU per decode step.
            table_VD = self._image_embeds(torch.arange(V, device=self.device)[:, None])[:, 0].to(text_dtype)
            rows = 2 if params.uses_cfg else 1
            embed = lambda tok_B: table_VD[tok_B.repeat(rows)].unsqueeze(1)  # noqa: E731  cond and uncond rows
        return fast, embed

    def sample_tokens(self, ids_BP: torch.Tensor, valid_BP: torch.Tensor, params: SamplingParams,
                      noise: torch.Tensor | torch.Generator,
                      parts: tuple[FastLlamaDecoder | None, Callable] | None = None):
        """Draw one image per row of already encoded prompts -> DecodeOutput(tokens [B,T], logp [B,T]).
        `noise`: [B, T] uniforms in [0, 1) (one per token), or a generator to draw them from. `parts`:
        `_sampler_parts` of the current weights, to share between calls (built here when None)."""
        if isinstance(noise, torch.Generator):
            noise = torch.rand(ids_BP.shape[0], self.num_image_tokens, generator=noise, dtype=torch.float64,
                               device=noise.device)
        rows_RP = torch.cat([ids_BP, self.uncond_ids(ids_BP)]) if params.uses_cfg else ids_BP
        fast, embed = parts if parts is not None else self._sampler_parts(params, ids_BP.shape[0])
        return cfg_decode(
            forward=fast if fast is not None else self._lm_forward,
            guided_logits=lambda h: self._guided_logits(h, params.cfg_scale),
            embed=embed,
            prompt_embeds_RPD=self._text_embeds(rows_RP),
            prompt_valid_RP=self._cond_uncond(valid_BP, params),
            uniforms_BT=noise,
            params=params,
            static=self.decode_static if fast is not None else "",  # (the fixed-shape step needs the lean decoder)
        )

    def decode_images(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """VQ-decode image tokens -> [B, 3, H, W] float32 in [0, 1] (Janus pixels live in [-1, 1])."""
        x = self.model.model.vqmodel.decode(tokens_BT)
        return ((x.float().clamp(-1, 1) + 1) / 2).contiguous()

    # ---- training -------------------------------------------------------------------------------
    def log_prob(self, rollout: Rollout, units: torch.Tensor, need_kl_terms: bool = False) -> LogProbOutput:
        rp = rollout.replay
        params: SamplingParams = rp.get("sampling", self.params)
        ids_NP = rp["prompt_ids"].to(self.device)
        valid_NP = rp["prompt_mask"].to(self.device)
        img_NT = rp["image_tokens"].to(self.device)
        units_K = torch.as_tensor(units, dtype=torch.long, device=self.device)
        N, P = ids_NP.shape
        # inputs: prompt + image tokens that precede the last scored unit; position P-1+t predicts token t
        t_end = int(units_K.max()) + 1
        feed_NT = img_NT[:, : t_end - 1]
        text_RPD = self._text_embeds(torch.cat([ids_NP, self.uncond_ids(ids_NP)]) if params.uses_cfg else ids_NP)
        img_RTD = self._cond_uncond(self._image_embeds(feed_NT), params)
        embeds = torch.cat([text_RPD, img_RTD.to(text_RPD.dtype)], 1)
        valid_RL = self._cond_uncond(torch.cat([valid_NP, valid_NP.new_ones(N, feed_NT.shape[1])], 1), params)
        with self._checkpointing():
            h_RLD = self._lm_forward(embeds, causal_padding_mask(valid_RL), positions_from_valid(valid_RL))
        h_RKD = h_RLD[:, P - 1 + units_K]
        logits_NKV = sampling_logits(self._guided_logits(h_RKD, params.cfg_scale), params, keep=img_NT[:, units_K])
        return LogProbOutput(logp=gather_logprobs(logits_NKV, img_NT[:, units_K]))

    @contextlib.contextmanager
    def _checkpointing(self) -> Iterator[None]:
        """transformers checkpoints a layer only in train mode; the loop keeps modules in eval mode (no
        dropout), so flip the flag on the decoder layers alone (their children, e.g. LoRA dropout, stay in
        eval) while gradients are being recorded."""
        if not (self.cfg.model.gradient_checkpointing and torch.is_grad_enabled()):
            yield
            return
        layers = [m for m in self._base_lm().modules() if getattr(m, "gradient_checkpointing", False) and m is not self._base_lm()]
        saved = [m.training for m in layers]
        for m in layers:
            m.training = True
        try:
            yield
        finally:
            for m, s in zip(layers, saved):
                m.training = s

    # ---- export ---------------------------------------------------------------------------------
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The Janus state dict with LoRA deltas merged into the base weights (adapters untouched)."""
        if not self.uses_lora():
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        from peft.tuners.lora import LoraLayer

        prefix = "model.language_model."
        base = self._base_lm()
        lm_sd = {}
        for k, v in base.state_dict().items():
            if "lora_" in k:
                continue
            lm_sd[k.replace(".base_layer.", ".")] = v.detach()
        for name, mod in base.named_modules():
            if isinstance(mod, LoraLayer):
                w = mod.get_base_layer().weight
                delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters)
                lm_sd[f"{name}.weight"] = (w + delta.to(w.dtype)).detach()
        sd = {k: v.detach() for k, v in self.model.state_dict().items() if not k.startswith(prefix)}
        sd.update({prefix + k: v for k, v in lm_sd.items()})
        return sd

    def processor(self):
        """transformers' `JanusProcessor` for this model (tokenizer, image processor, chat template), which
        `save_pretrained` writes beside the weights so that an export is used like the original checkpoint:
        the checkpoint's own for a real model (None when it has none, e.g. a directory holding weights and
        a tokenizer only), one built for the tiny models."""
        m = self.cfg.model
        if m.tiny:
            return _tiny_processor(self.model, self.tokenizer)
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(m.path, **hub_kwargs(m.revision, m.trust_remote_code))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
            return None

    def save_pretrained(self, path: str) -> None:
        """Write a plain transformers Janus checkpoint (LoRA merged) + its processor (or, for a checkpoint without
        one, its tokenizer), loadable with `JanusForConditionalGeneration.from_pretrained(path)`,
        `JanusProcessor.from_pretrained(path)` or `model.path=<path>`."""
        from transformers import JanusForConditionalGeneration

        sd = self.merged_state_dict()
        with torch.device("meta"):
            clean = JanusForConditionalGeneration(copy.deepcopy(self.model.config))
        clean.load_state_dict(sd, assign=True, strict=True)
        clean.generation_config = copy.deepcopy(self.model.generation_config)
        clean.save_pretrained(path)
        processor = self.processor()
        if processor is not None:
            processor.save_pretrained(path)  # (with the tokenizer)
        else:
            warnings.warn(f"model.path={self.cfg.model.path} has no processor that transformers' AutoProcessor loads: "
                          f"the export at {path} holds the weights and the tokenizer only", stacklevel=2)
            self.tokenizer.save_pretrained(path)


def load_janus(path: str, revision: str = "", trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A real Janus(-Pro) checkpoint in transformers format (local directory or hub id) + its tokenizer."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    kw = hub_kwargs(revision, trust_remote_code)
    try:
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        if msg := not_downloaded_error(path, e):
            raise ValueError(msg) from e
        raise ValueError(
            f"model.path='{path}': cannot load a transformers Janus checkpoint ({type(e).__name__}: {e}). "
            "Use a transformers-format checkpoint, e.g. deepseek-community/Janus-Pro-7B or "
            "deepseek-community/Janus-Pro-1B (the deepseek-ai/* repos use the original remote code format), "
            "or a directory written by `imagerl export`/save_pretrained; offline, download it first."
        ) from e
    return model.eval(), tokenizer
