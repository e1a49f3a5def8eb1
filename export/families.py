"""Uniform description of the MoE models fedmoe trains, and the families it accepts.

Every such model holds fedmoe's own block (``export.moe_block.MoeBlock``) at ``model.model.layers[i].mlp`` of its MoE
layers: pretrained MoE checkpoints of :data:`MOE_FAMILIES` are mapped into it when loaded (``export.hf_moe``), dense
decoders of :data:`DENSE_FAMILIES` get it by sparse upcycling (``export.upcycle``). :func:`describe` turns such a
model into a :class:`MoeDescription` that the rest of the export pipeline (importance, pruning, planner, bundle)
uses without caring about the family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from device_runtime.bundle import ROUTER_WEIGHT
from device_runtime.errors import UnsupportedArchitectureError
from device_runtime.modes import TrainableMode

# model_type -> whether the router renormalises its top-k weights (None: the config's ``norm_topk_prob`` says)
MOE_FAMILIES: dict[str, bool | None] = {
    "mixtral": True,
    "qwen2_moe": None,
    "qwen3_moe": None,
    "olmoe": None,
    "granitemoe": True,  # softmax over the top-k logits: the renormalised top-k of the softmax
}
# dense decoders with a gated MLP (gate/up/down, or Phi-3's fused gate_up) that `fedmoe-export upcycle` accepts
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # (E, 2I, H), (E, H, I)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer.

    Attributes:
        index: decoder-layer index in ``model.model.layers``.
        num_experts: experts in this layer. experts_per_token: top-k.
        router: state_dict name of the router weight ``(num_experts, hidden)``.
        experts: state_dict names of the expert tensors, experts on axis 0.
    """

    index: int
    num_experts: int
    experts_per_token: int
    router: str
    experts: tuple[str, ...]


@dataclass(frozen=True)
class MoeDescription:
    """A MoE model described uniformly: family, sizes and its MoE layers (in order)."""

    family: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_hidden_layers: int
    layers: tuple[MoeLayer, ...]

    @property
    def num_experts(self) -> int:
        return max(layer.num_experts for layer in self.layers)

    @property
    def experts_per_token(self) -> int:
        return max(layer.experts_per_token for layer in self.layers)

    def expert_tensors(self, state_names: Sequence[str]) -> list[tuple[str, int]]:
        """``(name, moe_layer)`` of every tensor of ``state_names`` indexed by expert on axis 0: routers,
        experts and LoRA adapters (``moe_layer`` indexes :attr:`layers`)."""
        found = []
        for l, layer in enumerate(self.layers):
            prefix = f"model.layers.{layer.index}.mlp."
            found += [(n, l) for n in state_names if n == layer.router or n.startswith(prefix + "experts.")]
        return found

    def trainable_tensors(self, state_names: Sequence[str], mode: str) -> list[tuple[str, int]]:
        """``(name, moe_layer)`` of what devices train and the coordinator federates: routers plus the full expert
        tensors (``mode="experts"``) or the experts' LoRA adapters (``"lora"``: the base expert weights stay frozen
        in the bundle's ORT checkpoint and never travel in a round)."""
        return [
            (n, l)
            for n, l in self.expert_tensors(state_names)
            if n.endswith(ROUTER_WEIGHT) or (("_lora_" in n) == (mode == TrainableMode.LORA))
        ]


def describe(model) -> MoeDescription:
    """Describe a loaded CausalLM holding fedmoe MoE blocks (``export.moe_block``).

    ``family`` is the config's ``model_type``: a MoE family's own, or the dense family of an upcycled model.

    Raises:
        UnsupportedArchitectureError: the model holds no fedmoe MoE block (naming what to do: upcycle a dense
            model, load a MoE checkpoint with ``export.loading.load_causal_lm``).
    """
    from export.moe_block import moe_blocks

    config = model.config
    family = str(getattr(config, "model_type", None))
    blocks = moe_blocks(model)
    if not blocks:
        archs = getattr(config, "architectures", None) or [type(model).__name__]
        if family in MOE_FAMILIES:
            hint = "load it with export.loading.load_causal_lm (or export.hf_moe.to_fedmoe) to map it into the block"
        elif family in DENSE_FAMILIES:
            hint = "a dense model: upcycle it with `fedmoe-export upcycle`"
        else:
            hint = f"supported MoE families: {', '.join(MOE_FAMILIES)}; dense (upcycle): {', '.join(DENSE_FAMILIES)}"
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} (model_type {family!r}) holds no fedmoe MoE layer; {hint}"
        )
    layers = tuple(
        MoeLayer(
            index=index,
            num_experts=int(block.gate.weight.shape[0]),
            experts_per_token=int(block.gate.top_k),
            router=f"model.layers.{index}.{ROUTER_WEIGHT}",
            experts=tuple(f"model.layers.{index}.{name}" for name in EXPERT_TENSORS),
        )
        for index, block in blocks
    )
    return MoeDescription(
        family=family,
        hidden_size=int(config.hidden_size),
        intermediate_size=int(blocks[0][1].experts.down_proj.shape[2]),
        vocab_size=int(config.vocab_size),
        num_hidden_layers=int(config.num_hidden_layers),
        layers=layers,
    )
