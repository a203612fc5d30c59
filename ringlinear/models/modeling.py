"""RingLinearForCausalLM: the Ring-linear-2.0 hybrid (BailingMoeLinearV2ForCausalLM), names = checkpoint keys."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.linear import active_invariant_mode, invariant_mode
from ..ops.lm_head import lm_head_fp32
from ..ops.loss import linear_cross_entropy
from .cache import HybridCache
from .checkpoint import load_pretrained, save_pretrained
from .config import RingLinearConfig
from .context import AttentionContext, StatelessContext, check_numerics, positions_from_cu_seqlens
from .layers import MLP, LinearAttention, RMSNorm, RotaryEmbedding, SoftmaxAttention
from .moe import SparseMoeBlock


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RingLinearConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = cfg.is_softmax_layer(layer_idx)
        self.attention = (SoftmaxAttention if self.is_softmax else LinearAttention)(cfg, layer_idx)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, ctx):  # h [T, hidden]
        h = h + self.attention(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class RingLinearModel(nn.Module):
    def __init__(self, cfg: RingLinearConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def forward_packed(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids [T] packed as ctx describes -> final-normed hidden states [T, hidden]."""
        h = self.word_embeddings(input_ids)
        cos, sin = self.rotary_emb(ctx.positions)
        mode = active_invariant_mode() if self.gradient_checkpointing and self.training else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = checkpoint(_layer_in_mode, layer, h, cos, sin, ctx, mode, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        return self.norm(h)


def _layer_in_mode(layer, h, cos, sin, ctx, mode):
    """One decoder layer inside `mode` (the invariant linear mode, re-entered when backward recomputes it)."""
    with mode.fresh() if mode is not None else contextlib.nullcontext():
        return layer(h, cos, sin, ctx)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (or [1, T, V] packed) fp32
    cache: object | None = None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # [B, T, hidden] when requested


class RingLinearForCausalLM(nn.Module):
    """Transformers-like API: `from_pretrained`, `save_pretrained`, `model(input_ids, ...)`.

    Logits come from an fp32 lm_head (bf16 weights and inputs, fp32 accumulation and output) so that log-probs in
    training and serving agree (docs/numerics.md).
    """

    def __init__(self, config: RingLinearConfig):
        super().__init__()
        self.config = config
        self.model = RingLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self.numerics = "default"

    def set_numerics(self, numerics: str) -> "RingLinearForCausalLM":
        """"default" (fastest kernels) or "aligned" (the arithmetic aligned serving reproduces bit for bit: the
        cache-free forward then runs batch-invariant linears and the fixed-order attention kernels)."""
        self.numerics = check_numerics(numerics)
        return self

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Random init (normal, std = initializer_range; norms = 1; expert bias = 0), deterministic given seed, drawn
        on the parameters' device (a generator of that device: CPU and CUDA draw different numbers). Tensors are
        drawn in checkpoint order (the routed experts one expert and projection at a time)."""
        dev = next(self.parameters()).device
        gen = torch.Generator(device=dev)
        gen.manual_seed(0 if seed is None else seed)
        std = self.config.initializer_range

        def draw(t):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32, device=dev) * std)

        # The routed experts come right after their router in checkpoint order (and in the order of earlier
        # versions, which kept them as per-expert Parameters): same seed, same weights.
        experts_after = {mod.gate.weight: mod for mod in self.modules() if isinstance(mod, SparseMoeBlock)}
        stacks = {p for mod in experts_after.values() for p in (mod.w13, mod.w2)}
        for name, p in self.named_parameters():
            if p.device.type == "meta" or p in stacks:
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                draw(p)
            moe = experts_after.get(p)
            if moe is not None:
                I = moe.inter
                for e in range(moe.num_experts):
                    draw(moe.w13[e, :I])
                    draw(moe.w13[e, I:])
                    draw(moe.w2[e])
        for mod in self.modules():
            if hasattr(mod, "expert_bias"):
                mod.expert_bias.zero_()
        return self

    @classmethod
    def from_config(cls, config: RingLinearConfig, dtype=None, device=None, seed: int = 0):
        """Random weights, allocated once on `device` and drawn there (no CPU pass over 16B parameters)."""
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device or "cpu")
        return model.init_weights(seed)

    # ------------------------------------------------------------------ checkpoint IO
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=None, device=None, strict: bool = True,
                        quantization: str | None = None, fp8_recipe=None, **config_overrides):
        """Load a checkpoint directory. `config_overrides` replace config.json fields for this load, e.g.
        `decay_layer_formula="sglang"` or `max_position_embeddings=...` (checked like config.json itself).
        `quantization="fp8"`: FP8 weights for inference (models/fp8_serve.py); None: as the checkpoint is stored."""
        return load_pretrained(cls, path, dtype=dtype, device=device, strict=strict, quantization=quantization,
                               fp8_recipe=fp8_recipe, **config_overrides)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 4 << 30, tokenizer_dir=None):
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer_dir)

    # ------------------------------------------------------------------ forward
    def forward_packed(self, input_ids: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids [T] packed as ctx describes -> final-normed hidden states [T, hidden]; `compute_logits` turns
        the rows that need them into logits. The entry point of anything that owns its attention state (the
        serving engine, CUDA graphs)."""
        return self.model.forward_packed(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., h] -> fp32 logits [..., V]."""
        shp = hidden.shape
        return lm_head_fp32(hidden.reshape(-1, shp[-1]), self.lm_head.weight).view(*shp[:-1], -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                use_cache: bool = False, cu_seqlens: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int | None = None, output_hidden_states: bool = False,
                ctx: AttentionContext | None = None, max_seqlen: int | None = None, return_logits: bool = True,
                loss_reduction: str = "mean") -> CausalLMOutput:
        """input_ids [B, T]. attention_mask [B, T] (1 = token, 0 = padding, left or right) packs the real tokens
        so padding never enters attention or state. cu_seqlens [N+1] (with B == 1) marks packed documents;
        max_seqlen: their longest (a host int; computed from cu_seqlens when it is on the CPU).
        cache: a HybridCache (one entry per row) to continue from; use_cache creates one if None.
        labels [B, T]: next-token targets aligned with input_ids (-100 = ignore); loss in fp32, the mean (or the
        sum: loss_reduction="sum"). return_logits=False (with labels): the loss comes from the fused linear +
        cross-entropy, no [tokens, vocab] logits tensor exists.
        logits_to_keep: only the last k positions of each row get logits (k=1 for generation).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (the fused loss is then the only output)")
        if self.numerics == "aligned" and cache is None and not use_cache:
            with invariant_mode(input_ids.device):
                return self._forward(input_ids, attention_mask, cache, use_cache, cu_seqlens, labels,
                                     logits_to_keep, output_hidden_states, ctx, max_seqlen, return_logits,
                                     loss_reduction)
        return self._forward(input_ids, attention_mask, cache, use_cache, cu_seqlens, labels, logits_to_keep,
                             output_hidden_states, ctx, max_seqlen, return_logits, loss_reduction)

    def _forward(self, input_ids, attention_mask, cache, use_cache, cu_seqlens, labels, logits_to_keep,
                 output_hidden_states, ctx, max_seqlen, return_logits, loss_reduction):
        B, T = input_ids.shape
        dev = input_ids.device
        fin = dict(labels=labels, logits_to_keep=logits_to_keep, output_hidden_states=output_hidden_states,
                   return_logits=return_logits, loss_reduction=loss_reduction)
        if ctx is not None:
            flat_ids = input_ids.reshape(-1)
            hidden = self.model.forward_packed(flat_ids, ctx)
            return self._finish(hidden.view(B, T, -1), None, mask=None, **fin)
        if cu_seqlens is not None:
            if B != 1 or attention_mask is not None:
                raise ValueError("cu_seqlens needs input_ids of shape [1, T] and no attention_mask")
            if cache is not None or use_cache:
                raise ValueError("cu_seqlens packing is for cache-free forward (training/scoring)")
            if max_seqlen is None and cu_seqlens.device.type == "cpu":
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else T
            ctx = StatelessContext(cu_seqlens.to(dev, non_blocking=True), max_seqlen=max_seqlen, total=T,
                                   numerics=self.numerics)
            hidden = self.model.forward_packed(input_ids[0], ctx)[None]
            return self._finish(hidden, None, mask=None, **fin)

        if attention_mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {(B, T)}")
            mask = attention_mask.to(dev).bool()
        lens = mask.sum(1)
        cu = F.pad(torch.cumsum(lens, 0), (1, 0))
        flat_ids = input_ids[mask]
        if cache is None and use_cache:
            cache = HybridCache(self.config, batch_size=B, dtype=self.lm_head.weight.dtype, device=dev)
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} sequences but input has {B} rows")
            ctx = cache.context(cu, lens)
        else:
            ctx = StatelessContext(cu, positions_from_cu_seqlens(cu), numerics=self.numerics)
        hidden_packed = self.model.forward_packed(flat_ids, ctx)
        if cache is not None:
            cache.commit(lens)
        hidden = hidden_packed.new_zeros(B, T, hidden_packed.shape[-1])
        hidden[mask] = hidden_packed
        return self._finish(hidden, cache, mask=mask, **fin)

    def _finish(self, hidden, cache, labels, logits_to_keep, output_hidden_states, mask, return_logits,
                loss_reduction):
        loss = None
        if labels is not None and not return_logits:
            h = hidden.reshape(-1, hidden.shape[-1])
            loss = linear_cross_entropy(h, self.lm_head.weight, labels.reshape(-1).to(h.device),
                                        reduction=loss_reduction)
            return CausalLMOutput(logits=None, cache=cache, loss=loss,
                                  hidden_states=hidden if output_hidden_states else None)
        if labels is not None:
            lg = self.compute_logits(hidden)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1).to(lg.device), ignore_index=-100,
                                   reduction=loss_reduction)
            logits = lg if logits_to_keep is None else lg[:, -logits_to_keep:]
        else:
            h = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
            logits = self.compute_logits(h)
        if mask is not None and logits_to_keep is None:
            logits = logits * mask[..., None]  # padding rows: zeros, not garbage
        return CausalLMOutput(logits=logits, cache=cache, loss=loss,
                              hidden_states=hidden if output_hidden_states else None)


def count_parameters(cfg: RingLinearConfig) -> dict:
    """Total and active parameter counts (with and without embeddings), computed on the meta device."""
    with torch.device("meta"):
        m = RingLinearForCausalLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    emb = m.model.word_embeddings.weight.numel() + (0 if cfg.tie_word_embeddings else m.lm_head.weight.numel())
    inactive = 0
    if cfg.num_experts:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        inactive = len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    active = total - inactive
    return {"total": total, "active": active, "embedding": emb, "active_non_embedding": active - emb,
            "total_non_embedding": total - emb}


def state_bytes_per_sequence(cfg: RingLinearConfig) -> int:
    """fp32 linear-attention state of one sequence, all linear layers."""
    return len(cfg.linear_layers) * cfg.num_attention_heads * cfg.head_dim_ ** 2 * 4


def kv_bytes_per_token(cfg: RingLinearConfig, dtype_bytes: int = 2) -> int:
    return len(cfg.softmax_layers) * 2 * cfg.num_key_value_heads * cfg.head_dim_ * dtype_bytes

