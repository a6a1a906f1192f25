"""Small deterministic models and data shared by the distributed tests."""

import torch


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 8),
        torch.nn.LayerNorm(8),
    )


def global_batches(num_steps: int, global_batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(global_batch, 16, generator=generator), torch.randn(global_batch, 8, generator=generator))
        for _ in range(num_steps)
    ]


def micro_batches(batch, rank: int, world_size: int, accumulation_steps: int):
    """This rank's micro-batches of one global batch: rank-major, then micro-step."""
    inputs, targets = batch
    per_rank = inputs.shape[0] // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    micro = per_rank // accumulation_steps
    return [
        (inputs[mine][i * micro : (i + 1) * micro], targets[mine][i * micro : (i + 1) * micro])
        for i in range(accumulation_steps)
    ]


def reference_training(num_steps, global_batch, accumulation_steps, world_size, clip, lr=1e-2):
    """Plain PyTorch on one process: the same global batch, mean loss, clipping, AdamW."""
    model = make_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for batch in global_batches(num_steps, global_batch):
        for rank in range(world_size):
            for inputs, targets in micro_batches(batch, rank, world_size, accumulation_steps):
                loss = torch.nn.functional.mse_loss(model(inputs), targets)
                (loss / (accumulation_steps * world_size)).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class TinyBlock(torch.nn.Module):
    """Module names that the low-rank optimizers' default targets (attn, mlp) pick up."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(16, 24)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.mlp(torch.tanh(self.attn(x))))


def make_block(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyBlock()


# ---- models for the equivalence table: forward(x, route, step) ----------------------------------
# route: the rank whose data this is (so a single process can replay rank-dependent use);
# step: the optimizer step (for layers used on some steps only).


class TiedModel(torch.nn.Module):
    """An input projection whose weight is reused, transposed, as the output projection."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(16, 24, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.GELU())
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x, route=0, step=0):
        hidden = self.mlp(self.embed(x))
        return self.head(torch.nn.functional.linear(hidden, self.embed.weight.t()))


class FrozenModel(torch.nn.Module):
    """A frozen first layer (requires_grad=False) and a frozen buffer-carrying norm."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(16, 24)
        self.frozen.requires_grad_(False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    def forward(self, x, route=0, step=0):
        return self.mlp(torch.tanh(self.frozen(x)))


class RankRoutedMoE(torch.nn.Module):
    """Two experts; each rank's data goes through expert (rank % 2): on 2 ranks each expert is
    used on one rank only."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(16, 24)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 24)) for _ in range(2)
        )
        self.out = torch.nn.Linear(24, 8)

    def forward(self, x, route=0, step=0):
        hidden = torch.tanh(self.attn(x))
        return self.out(hidden + self.experts[route % 2](hidden))


class SometimesUsed(torch.nn.Module):
    """A layer used on even steps only: on odd steps no rank gives it a gradient."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(16, 24)
        self.extra = torch.nn.Linear(24, 24)
        self.mlp = torch.nn.Linear(24, 8)

    def forward(self, x, route=0, step=0):
        hidden = torch.tanh(self.attn(x))
        if step % 2 == 0:
            hidden = hidden + self.extra(hidden)
        return self.mlp(hidden)


class SingleTensor(torch.nn.Module):
    """One parameter tensor: on 2 ranks at stage 1/2, one rank owns nothing."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x, route=0, step=0):
        return self.mlp(x)


EQUIVALENCE_MODELS = {
    "tied": TiedModel,
    "frozen": FrozenModel,
    "moe": RankRoutedMoE,
    "sometimes": SometimesUsed,
    "single": SingleTensor,
}


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return EQUIVALENCE_MODELS[name]()
