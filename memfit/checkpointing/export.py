"""A checkpoint (any stage, world size, offload tier, optimizer) as one state dict under the
model's own names, written tensor by tensor: `memfit export`, and engine.save_16bit_model.

Every rank file is checked against the manifest's digest first (a flipped byte or a truncated
file is a CheckpointError naming the file); the files are then memory-mapped and each tensor is
verified again as it is read, converted to the asked dtype and written, so memory holds one
tensor at a time. Safetensors output is one
`model.safetensors`, or past max_shard_bytes Hugging Face's sharded layout:
`model-00001-of-0000N.safetensors` files and `model.safetensors.index.json` with the total size
and the file of each tensor. Torch output is one `pytorch_model.bin` (torch.save, which needs the
tensors in memory together: use safetensors for a model larger than RAM)."""

import json
import os

import torch

from memfit.checkpointing.disk import MANIFEST, DiskSource, resolve_tag, verify_checkpoint
from memfit.checkpointing.integrity import CheckpointError
from memfit.checkpointing.safetensors_writer import write_safetensors

FORMATS = ("safetensors", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"


class ConsolidatedState:
    """The model's state dict read from a checkpoint directory: names in order, each with the
    rank file and path it is read from."""

    def __init__(self, checkpoint_dir: str, tag: str | None = None):
        checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
        is_tag = os.path.exists(os.path.join(checkpoint_dir, MANIFEST))
        self.directory = checkpoint_dir if is_tag and tag is None else resolve_tag(checkpoint_dir, tag)
        # every file whole first (one streamed pass): a damaged checkpoint is refused even where the
        # damage is in what export does not copy (optimizer state)
        if problems := verify_checkpoint(self.directory):
            raise CheckpointError(problems[0])
        self.source = DiskSource(self.directory)
        first = self.source.payload(0)
        layout = first.get("state_dict_layout", {})
        persistent = layout.get("persistent_buffers")
        self.where: dict[str, tuple[int, str]] = {}
        for name, owner in self.source.owner_of.items():
            self.where[name] = (owner, f"params/{name}")
        for name in first.get("frozen", {}):
            self.where[name] = (0, f"frozen/{name}")
        for name in first.get("buffers", {}):
            if persistent is None or name in persistent:
                self.where[name] = (0, f"buffers/{name}")
        for alias, name in layout.get("aliases", {}).items():
            self.where[alias] = self.where[name]  # a tied parameter appears under each of its names

    def names(self) -> list[str]:
        return list(self.where)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        rank, path = self.where[name]
        value = self.source.tensor(rank, path)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value

    def shape_and_dtype(self, name: str, dtype: torch.dtype | None) -> tuple[torch.Size, torch.dtype]:
        rank, path = self.where[name]
        value = self.source.payload(rank)
        for part in path.split("/", 1):  # the memory-mapped tensor, not read: it is verified when written
            value = value[part]
        return value.shape, dtype if dtype is not None and value.is_floating_point() else value.dtype

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, dtype) for name in self.where}


def export_checkpoint(
    checkpoint_dir, out_dir, *, fmt: str = "safetensors", dtype: str = "fp32", tag=None, max_shard_bytes=None
) -> list[str]:
    """Writes the checkpoint's model state into out_dir; returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    state = ConsolidatedState(checkpoint_dir, tag)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "torch":
        path = os.path.join(out_dir, TORCH_NAME)
        torch.save(state.state_dict(DTYPES[dtype]), path)
        return [path]
    return write_safetensors_shards(state, out_dir, DTYPES[dtype], max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)


def write_safetensors_shards(state: ConsolidatedState, out_dir: str, dtype, max_shard_bytes: int) -> list[str]:
    """One file, or shards of at most max_shard_bytes (a larger tensor gets a shard of its own)
    and Hugging Face's index."""
    entries = [(name, *state.shape_and_dtype(name, dtype)) for name in state.names()]
    shards, current, current_bytes = [], [], 0
    for entry in entries:
        num_bytes = entry[1].numel() * torch.empty((), dtype=entry[2]).element_size()
        if current and current_bytes + num_bytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += num_bytes
    shards.append(current)
    metadata = {"format": "pt"}  # what transformers expects to find in the header

    def read(name):
        return state.tensor(name, dtype)

    if len(shards) == 1:
        path = os.path.join(out_dir, SAFETENSORS_NAME)
        write_safetensors(path, shards[0], read, metadata)
        return [path]
    written, weight_map, total_bytes = [], {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total_bytes += write_safetensors(os.path.join(out_dir, file_name), shard, read, metadata)
        weight_map.update((name, file_name) for name, _, _ in shard)
        written.append(os.path.join(out_dir, file_name))
    index_path = os.path.join(out_dir, SAFETENSORS_INDEX)
    with open(index_path, "w") as file:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, file, indent=2)
    return [*written, index_path]


def save_module_state(module: torch.nn.Module, path: str | None, gathered=None) -> None:
    """module.state_dict() as it is (16-bit under bf16/fp16 training): safetensors when path ends
    in .safetensors, torch.save otherwise. A tied parameter is written under each of its names.

    gathered(params): at ZeRO stage 3, a context in which params are whole on every rank; each
    tensor is then gathered in turn (one at a time for safetensors), on every rank in the same
    order, and only the rank given a path writes."""
    state = module.state_dict()
    params = dict(module.named_parameters(remove_duplicate=False))

    def value(name):
        param = params.get(name)
        if gathered is None or param is None:
            return state[name]
        with gathered([param]):
            return param.detach().clone()

    if path is None:  # another rank writes: take part in each gather
        for name in state:
            value(name)
    elif path.endswith(".safetensors"):
        entries = [(name, tensor.shape, tensor.dtype) for name, tensor in state.items()]
        write_safetensors(path, entries, value, {"format": "pt"})
    else:
        torch.save({name: value(name).detach().cpu() for name in state}, path)  # loads without a GPU


__all__ = ["CheckpointError", "ConsolidatedState", "export_checkpoint", "save_module_state"]
