"""What the ported DeepSpeed tests train: a small classifier that returns its loss, random
batches of the micro-batch size, and a run through memfit.deepspeed.initialize with the test's
config (DeepSpeed's own tests use a model and loader of the same shape)."""

import torch

import memfit.deepspeed as deepspeed


class ClassifierWithLoss(torch.nn.Module):
    """num_layers square linears. With more than one, layer k adds its output to that of layer
    k // 2 on the same input, so most layers run twice per forward, as in DeepSpeed's test model
    (at ZeRO stage 3 a module gathered again while its tensors may still be in use)."""

    def __init__(self, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        self.linears = torch.nn.ModuleList(torch.nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers))
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, x, y):
        if len(self.linears) == 1:
            return self.loss(self.linears[0](x), y)
        for index, layer in enumerate(self.linears):
            x = self.linears[index // 2](x) + layer(x)  # x: (batch, hidden_dim)
        return self.loss(x, y)


def random_batches(num_samples: int, micro_batch: int, hidden_dim: int, seed: int = 0, dtype=torch.float32):
    """(inputs, labels) batches; inputs in the model's compute dtype, as DeepSpeed's loader gives."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, hidden_dim, generator=generator).to(dtype)
    labels = torch.randint(0, hidden_dim, (num_samples,), generator=generator)
    return [(inputs[i : i + micro_batch], labels[i : i + micro_batch]) for i in range(0, num_samples, micro_batch)]


def start(config: dict, hidden_dim: int = 10):
    torch.manual_seed(0)
    model = ClassifierWithLoss(hidden_dim)
    return deepspeed.initialize(config=config, model=model, model_parameters=model.parameters())


def adam_config(schedule_type: str, params: dict, lr: float = 0.00015) -> dict:
    """The config DeepSpeed's lr-schedule tests use."""
    return {
        "train_batch_size": 2,
        "steps_per_print": 1,
        "optimizer": {"type": "Adam", "params": {"lr": lr}},
        "scheduler": {"type": schedule_type, "params": params},
        "gradient_clipping": 1.0,
    }
