"""Uniform description of the supported Hugging Face MoE families.

transformers 5.x keeps every supported family's experts as fused 3-D tensors under ``mlp.experts`` and its
router under ``mlp.gate``; only the config attribute names and a few extras (Qwen2-MoE's shared expert) differ.
:func:`describe` turns a loaded model into a :class:`MoeDescription` that the rest of the export pipeline
(importance, pruning, planner, bundle) uses without caring about the family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from device_runtime.bundle import ROUTER_WEIGHT
from device_runtime.errors import UnsupportedArchitectureError
from device_runtime.modes import TrainableMode

# model_type -> config attribute holding the number of experts per MoE layer
FAMILIES = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
}
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


def family_of(config) -> str:
    """The family name of a transformers config.

    Raises:
        UnsupportedArchitectureError: naming the architecture and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        archs = getattr(config, "architectures", None) or [model_type]
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} (model_type {model_type!r}) is not a supported MoE family; supported: "
            f"{', '.join(sorted(FAMILIES))}. A dense Llama-family model can be upcycled with `fedmoe-export upcycle`."
        )
    return model_type


def describe(model) -> MoeDescription:
    """Describe a loaded transformers MoE CausalLM.

    Raises:
        UnsupportedArchitectureError: the family is not supported or the layout is not the fused one.
    """
    family = family_of(model.config)
    layers = []
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if not (hasattr(mlp, "gate") and hasattr(mlp, "experts")):
            continue  # dense layer (e.g. Qwen2-MoE mlp_only_layers)
        if not hasattr(mlp.experts, "gate_up_proj"):
            raise UnsupportedArchitectureError(f"{family} layer {index}: experts are not fused 3-D tensors")
        prefix = f"model.layers.{index}."
        layers.append(
            MoeLayer(
                index=index,
                num_experts=int(mlp.gate.weight.shape[0]),
                experts_per_token=int(mlp.gate.top_k),
                router=prefix + ROUTER_WEIGHT,
                experts=tuple(prefix + name for name in EXPERT_TENSORS),
            )
        )
    if not layers:
        raise UnsupportedArchitectureError(f"{family} model has no MoE layer")
    config = model.config
    return MoeDescription(
        family=family,
        hidden_size=int(config.hidden_size),
        intermediate_size=int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        vocab_size=int(config.vocab_size),
        num_hidden_layers=int(config.num_hidden_layers),
        layers=tuple(layers),
    )
