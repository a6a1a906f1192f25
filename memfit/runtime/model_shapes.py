"""Tensor shapes of a model, without allocating it: a real model built on the meta device from a
`module:factory` spec, or a LLaMA-style decoder laid out for a parameter count (what
`memfit estimate --params 7e9` plans for when no model is given)."""

import importlib
import math
import os
import sys

import torch

VOCAB_SIZE = 32000
MIN_PARAMS = 100_000  # the smallest decoder laid out has about 12K


def parse_count(text: str) -> int:
    """'7e9', '7B', '125M', '1.5m', '200000' -> a number of parameters."""
    value = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(value[-1:], 1)
    if scale != 1:
        value = value[:-1]
    try:
        count = float(value) * scale
    except ValueError:
        raise ValueError(f"--params: expected a number like 7e9 or 7B, got {text!r}") from None
    if not math.isfinite(count) or count < MIN_PARAMS:
        raise ValueError(f"--params: expected at least {MIN_PARAMS:,} parameters, got {text!r}")
    return int(count)


def decoder_layout(num_params: int) -> tuple[int, int, int]:
    """(width, layers, vocabulary) of the decoder nearest num_params parameters, depth near the
    cube root of the size as in the LLaMA family (7B: 32 layers), width a multiple of 64 (16 for
    small models), vocabulary 32000 (256, byte-level, below 50M parameters)."""
    vocab = VOCAB_SIZE if num_params >= 50_000_000 else 256
    typical_layers = max(2, round(num_params ** (1 / 3) / 60))
    best = None
    for layers in range(max(1, typical_layers - 3), typical_layers + 4):
        # 12 layers w^2 + 2 vocab w = num_params, solved for w
        width_exact = (-2 * vocab + math.sqrt(4 * vocab * vocab + 48 * layers * num_params)) / (24 * layers)
        step = 64 if width_exact >= 512 else 16
        candidates = {math.floor(width_exact / step) * step, math.ceil(width_exact / step) * step}
        for width in sorted(max(step, c) for c in candidates):
            error = abs(_decoder_numel(width, layers, vocab) - num_params) + abs(layers - typical_layers)
            if best is None or error < best[0]:
                best = (error, width, layers)
    return best[1], best[2], vocab


def _swiglu_hidden(width: int) -> int:
    return -(-int(8 * width / 3) // 64) * 64


def _decoder_numel(width: int, layers: int, vocab: int) -> int:
    per_layer = 4 * width * width + 3 * _swiglu_hidden(width) * width + 2 * width
    return layers * per_layer + 2 * vocab * width + width


def decoder_shapes(num_params: int) -> tuple[list[tuple[str, tuple, bool]], str]:
    """(name, shape, trainable) of a LLaMA-style decoder near num_params, and a line describing it:
    embedding and untied output head, per layer q/k/v/o (width^2), a SwiGLU MLP (gate and up:
    hidden x width, down: width x hidden, hidden = 8/3 width) and two RMSNorm weights."""
    width, layers, vocab = decoder_layout(num_params)
    hidden = _swiglu_hidden(width)
    shapes = [("embed.weight", (vocab, width), True)]
    for index in range(layers):
        prefix = f"layers.{index}"
        shapes += [(f"{prefix}.attn.{name}.weight", (width, width), True) for name in ("q", "k", "v", "o")]
        shapes += [(f"{prefix}.mlp.{name}.weight", (hidden, width), True) for name in ("gate", "up")]
        shapes += [(f"{prefix}.mlp.down.weight", (width, hidden), True)]
        shapes += [(f"{prefix}.{name}.weight", (width,), True) for name in ("attn_norm", "mlp_norm")]
    shapes += [("norm.weight", (width,), True), ("head.weight", (vocab, width), True)]
    total = sum(torch.Size(shape).numel() for _, shape, _ in shapes)
    return shapes, f"a LLaMA-style decoder of {total:,} parameters (width {width}, {layers} layers, vocabulary {vocab})"


def load_factory(spec: str):
    """The factory `module:factory` names (the current directory is importable); a ValueError
    naming --model when it cannot be found."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise ValueError(f"--model: expected module:factory (like mypkg.models:build), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model: cannot import {module_name!r}: {error}") from None
    except Exception as error:  # the module itself fails as it runs
        raise ValueError(f"--model: importing {module_name!r} raised {type(error).__name__}: {error}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"--model: {module_name!r} has no callable {factory_name!r}")
    return factory


def build_on_meta(spec: str, factory) -> torch.nn.Module:
    """factory() on the meta device (nothing allocated); a ValueError naming --model if it raises
    or returns something else than a module."""
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as error:
        raise ValueError(f"--model: {spec} raised {type(error).__name__}: {error}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_shapes(spec: str) -> tuple[list[tuple[str, tuple, bool]], str]:
    """Shapes of the model that `module:factory` builds (the factory is called with no arguments,
    on the meta device, so nothing is allocated); the current directory is importable."""
    model = build_on_meta(spec, load_factory(spec))
    shapes = [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]
    total = sum(torch.Size(shape).numel() for _, shape, _ in shapes)
    return shapes, f"{spec}: {total:,} parameters in {len(shapes)} tensors"
