"""A LLaMA-style decoder in plain PyTorch: RMSNorm, rotary position embeddings, SwiGLU MLP,
byte-level vocabulary. Attention weights live under `.attn`, MLP weights under `.mlp`."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    dim: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab_size: int = 256

    @property
    def hidden_dim(self) -> int:
        return -(-int(8 * self.dim / 3) // 64) * 64  # SwiGLU width, rounded up to a multiple of 64


PRESETS = {
    "tiny": GPTConfig(dim=128, n_layers=4, n_heads=4, seq_len=128),  # ~0.8M parameters, for CI
    "small": GPTConfig(dim=512, n_layers=8, n_heads=8, seq_len=256),  # ~26M
    "base": GPTConfig(dim=768, n_layers=16, n_heads=12, seq_len=256),  # ~114M
    # For offload_optimizer "nvme": with bf16 compute, 2 bytes per parameter each for weights and
    # gradients stay in RAM, and 12 (fp32 master, exp_avg, exp_avg_sq) go to the swap file.
    "400m": GPTConfig(dim=1536, n_layers=14, n_heads=12, seq_len=256),  # ~0.40B
    "1b": GPTConfig(dim=2048, n_layers=20, n_heads=16, seq_len=256),  # ~1.01B
    "2b": GPTConfig(dim=2560, n_layers=24, n_heads=20, seq_len=256),  # ~1.89B
    "3b": GPTConfig(dim=3072, n_layers=24, n_heads=24, seq_len=256),  # ~2.72B: 43 GB of training state
    # For stage 3 with offload_param and offload_optimizer on NVMe (examples/configs/zero3_nvme.json):
    # 64 GB of training state, of which RAM holds what one layer and the step's buffers need.
    "4b": GPTConfig(dim=3584, n_layers=26, n_heads=28, seq_len=256),  # ~4.02B
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, seq_len: int, base: float = 10000.0):
    inverse_frequencies = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inverse_frequencies)  # (seq, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (batch, heads, seq, head_dim); pairs (even, odd) are rotated by the position's angle.
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    seq = x.shape[-2]
    cos, sin = cos[:seq], sin[:seq]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, dim = x.shape
        q, k, v = (
            w(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, seq, head_dim)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim), SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def memfit_example_inputs(self, micro_batch_size: int, seq_len: int | None = None):
        """One micro-batch of token ids, by which memfit traces the activations (memfit estimate,
        and initialize's host-memory check)."""
        shape = (micro_batch_size, seq_len or self.cfg.seq_len)
        return torch.zeros(shape, dtype=torch.long, device=self.embed.weight.device)

    def forward(self, tokens):
        # tokens: (batch, seq) of byte values -> logits (batch, seq, vocab)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x))


def __getattr__(name: str):
    """gpt_model.small (any preset's name) is a factory of that preset, for
    `memfit estimate --model examples.gpt_model:small`."""
    if name in PRESETS:
        return lambda: GPT(PRESETS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
