"""The representation-evolution signal: how much a decoder layer rewrites each token's residual stream,
`1 - cos(h_l, h_{l+1})` per token and layer.

Recorded inside the model's forward, so it must survive torch.compile and CUDA graphs: each decoder layer is
wrapped (`RecordingDecoderLayer`, at model load, before vLLM compiles). Traced, the wrapper stores each layer's
values through the custom op `infokv::store_evolution`, which declares the per-layer buffer it writes: the compiler
keeps an op that mutates its input, and a CUDA graph replays it into the same buffer; Python forward hooks, by
contrast, are traced once and their side effects dropped. The values themselves are computed outside the op, where
the compiler fuses them with the layer's own adds, and in eager mode no op is called at all (its dispatch costs
more than the arithmetic: about 35 of 67 us per layer for 8 tokens on a 2-core CPU). After the forward the
recorder copies the step's rows into the slot planes.
The buffers start as NaN and the first recording step checks that every layer wrote its rows, so a compiled
graph without the op fails loudly instead of scoring with nothing.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from infokv_vllm.signals import REPRESENTATION, ForwardOutputs, SignalRecorder, StepView


def representation_evolution(layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
    """1 - cos(h_l, h_{l+1}) per token; inputs [tokens, hidden]."""
    return 1.0 - torch.nn.functional.cosine_similarity(layer_input.float(), layer_output.float(), dim=-1)


@torch.library.custom_op("infokv::store_evolution", mutates_args=("buffer",))
def store_evolution(evolution: torch.Tensor, buffer: torch.Tensor) -> None:
    """buffer[:tokens] = evolution."""
    buffer[: evolution.shape[0]] = evolution


@store_evolution.register_fake
def _store_evolution_fake(evolution, buffer) -> None:
    return None


# What vLLM's decoder layers call their attention block (gpt-oss: `attn`)
ATTENTION_BLOCKS = ("self_attn", "attn")


class RecordingDecoderLayer(nn.Module):
    """A vLLM decoder layer, `forward(..., hidden_states, residual, ...) -> (hidden_states, residual)` (the
    arguments in its own order: Llama's layers take positions first, gpt-oss's hidden_states, Qwen3-Next's take
    keywords), that also records its representation evolution into its own buffer."""

    def __init__(self, layer: nn.Module, max_tokens: int) -> None:
        super().__init__()
        self.layer = layer
        names = list(inspect.signature(layer.forward).parameters)
        self.stream_at = (names.index("hidden_states"), names.index("residual"))
        parameter = next(layer.parameters())
        self.register_buffer("evolution", torch.full((max_tokens,), float("nan"), device=parameter.device),
                             persistent=False)

    def forward(self, *args, **kwargs):
        hidden_at, residual_at = self.stream_at
        hidden_states = args[hidden_at] if hidden_at < len(args) else kwargs["hidden_states"]
        residual = args[residual_at] if residual_at < len(args) else kwargs["residual"]
        # The residual stream entering the layer, summed before the layer runs: vLLM's fused add-RMSNorm updates
        # its inputs in place. The first layer's input becomes its residual, which that norm updates too, so it
        # is copied (vLLM's graph pass on CUDA refuses a graph that reads a donated input after the op).
        stream_in = hidden_states.clone() if residual is None else hidden_states + residual
        hidden_states, residual = self.layer(*args, **kwargs)
        evolution = representation_evolution(stream_in, hidden_states + residual)
        if torch.compiler.is_compiling():
            torch.ops.infokv.store_evolution(evolution, self.evolution)
        else:
            self.evolution[: evolution.shape[0]] = evolution
        return hidden_states, residual


def wrap_decoder_layers(model: nn.Module, max_tokens: int) -> dict[int, RecordingDecoderLayer]:
    """Wrap every decoder layer of a vLLM model in place; returns the wrappers by decoder-layer index.

    Decoder layers are the members of the model's `nn.ModuleList` that own an attention block (`ATTENTION_BLOCKS`);
    a hybrid model's linear-attention layers are not wrapped (nothing compresses their state).
    """
    wrapped: dict[int, RecordingDecoderLayer] = {}
    for module in list(model.modules()):
        if not isinstance(module, nn.ModuleList):
            continue
        for index, layer in enumerate(module):
            if any(hasattr(layer, name) for name in ATTENTION_BLOCKS):
                module[index] = wrapped[index] = RecordingDecoderLayer(layer, max_tokens)
    if not wrapped:
        raise RuntimeError(f"infokv-vllm: found no decoder layers (modules with one of {ATTENTION_BLOCKS}) in "
                           f"{type(model).__name__}; the representation signal cannot be recorded")
    return wrapped


class RepresentationRecorder(SignalRecorder):
    name = REPRESENTATION

    def __init__(self, storage, layers: list[RecordingDecoderLayer]) -> None:
        """`layers[i]` is the decoder layer of the i-th attention layer of the KV cache group."""
        super().__init__(storage)
        self.layers = layers
        self._checked = False

    def after_forward(self, step: StepView, outputs: ForwardOutputs, report) -> None:
        count = len(step.slots)
        if not self._checked:
            missing = [index for index, layer in enumerate(self.layers) if layer.evolution[:count].isnan().any()]
            if missing:
                raise RuntimeError(
                    f"infokv-vllm: decoder layers {missing} recorded no representation evolution this step; the "
                    "model's (compiled) forward does not run infokv::store_evolution")
            self._checked = True
        self.storage.write(REPRESENTATION, step.slots, torch.stack([layer.evolution[:count] for layer in self.layers]))
