"""A split device's bottom (HO-SFL, Chen et al., arXiv 2603.14773): the embeddings and decoder layers 0..K-1 of a
pruned MoE CausalLM as one forward-only ONNX graph for plain onnxruntime.

Graph (``device_runtime.graph_io`` names)::

    inputs   input_ids (batch, seq_len) int64, attention_mask (batch, seq_len) int64,
             then every trainable tensor by its state_dict name (the device binds them once and perturbs them
             in place, as the zeroth-order backend does with its eval graph)
    outputs  smashed (batch, seq_len, hidden) float32: the hidden states entering decoder layer K;
             routing_stats_{l} (4, E_l) for each MoE layer below the cut; num_tokens ()

Frozen weights (embeddings, attention, norms) are initializers of the graph. The routed experts run the
dense-masked implementation like every exported graph (``export.experts_impl``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from device_runtime.errors import ExportError, ModelError
from device_runtime.graph_io import ATTENTION_MASK, INPUT_IDS, NUM_TOKENS, ROUTING_STATS, SMASHED
from export.artifacts import OPSET
from export.moe_block import moe_blocks, use_dense_masked
from export.training_graph import routing_stats, routing_sums


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters but with its own child table (to swap children safely)."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    return out


def split_model(causal_lm: nn.Module, cut_layer: int) -> tuple[nn.Module, nn.Module]:
    """``(bottom, top)`` views of an HF decoder CausalLM cut before decoder layer ``cut_layer``, sharing its
    parameters: ``bottom(input_ids=, attention_mask=)`` is the base model over layers ``[0, K)`` without the final
    norm (``last_hidden_state`` is the smashed data); ``top(inputs_embeds=smashed, attention_mask=)`` is the
    CausalLM over layers ``[K, L)``, final norm and lm_head.

    Raises:
        ModelError: ``cut_layer`` not in ``[1, L)``.
    """
    base, layers = causal_lm.model, causal_lm.model.layers
    if not 1 <= cut_layer < len(layers):
        raise ModelError(f"cut layer must be in [1, {len(layers)}) for this {len(layers)}-layer model, got {cut_layer}")
    bottom = _shallow(base)
    bottom.layers, bottom.norm = nn.ModuleList(layers[:cut_layer]), nn.Identity()
    bottom.config = copy.copy(base.config)
    bottom.config.num_hidden_layers = cut_layer
    top = _shallow(causal_lm)
    top.model = _shallow(base)
    top.model.layers = nn.ModuleList(layers[cut_layer:])
    top.model.config = copy.copy(base.config)
    top.model.config.num_hidden_layers = len(layers) - cut_layer
    if hasattr(base.config, "layer_types") and base.config.layer_types is not None:
        bottom.config.layer_types = list(base.config.layer_types[:cut_layer])
        top.model.config.layer_types = list(base.config.layer_types[cut_layer:])
    return bottom, top


class BottomWrapper(nn.Module):
    """The bottom of ``causal_lm`` below ``cut_layer`` as the graph of the module docstring.

    Args:
        causal_lm: a (pruned) transformers MoE CausalLM. cut_layer: K, in ``[1, L)``.
        trainable: the state_dict names (``model.layers.{l}...``, all below the cut) that become graph inputs.

    Raises:
        ModelError: a bad cut, no MoE layer below it, or a trainable name that is not a bottom parameter.
    """

    def __init__(self, causal_lm: nn.Module, cut_layer: int, trainable: list[str] | tuple[str, ...]):
        super().__init__()
        use_dense_masked(causal_lm)
        bottom, _ = split_model(causal_lm, cut_layer)
        self.model = bottom
        self.trainable = tuple(trainable)
        params = dict(self.named_parameters())
        unknown = [n for n in self.trainable if n not in params]
        if unknown:
            raise ModelError(f"trainable names that are not parameters below the cut: {unknown[:3]}")
        self.routers = [block.gate for i, block in moe_blocks(causal_lm) if i < cut_layer]
        if not self.routers:
            raise ModelError(f"no MoE layer below the cut layer {cut_layer}")
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        for router in self.routers:
            router.register_forward_hook(lambda _m, _a, out: self._captured.append((out[0], out[2])))

    @property
    def input_names(self) -> tuple[str, ...]:
        """Graph inputs in feed order: the batch, then the trainable weights."""
        return (INPUT_IDS, ATTENTION_MASK, *self.trainable)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (SMASHED, *(ROUTING_STATS.format(l) for l in range(len(self.routers))), NUM_TOKENS)

    def forward(self, input_ids, attention_mask):
        self._captured = []
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        valid = attention_mask.reshape(-1, 1).to(torch.float32)
        captured, self._captured = self._captured, []
        stats = [routing_stats(*routing_sums(logits, index, valid)) for logits, index in captured]
        return (out.last_hidden_state, *stats, attention_mask.sum())


def _weights_as_inputs(path: Path, names: tuple[str, ...]) -> None:
    """Turn the initializers ``names`` of the ONNX model at ``path`` into graph inputs (after the batch inputs).

    Raises:
        ExportError: a name is not an initializer (renamed by the exporter, or unused by the forward).
    """
    model = onnx.load(str(path))
    inits = {init.name: init for init in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ExportError(f"trainable tensors {missing[:3]} are not initializers of the exported bottom")
    for name in names:
        init = inits[name]
        model.graph.initializer.remove(init)
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    onnx.save(model, str(path))


def export_bottom(wrapper: BottomWrapper, path: str | Path, *, vocab: int) -> None:
    """TorchScript-export ``wrapper`` (opset ``export.artifacts.OPSET``, dynamic batch and seq_len) to ``path``,
    its trainable tensors turned into graph inputs.

    Raises:
        ExportError: the exporter failed (chained), or a trainable tensor is not in the graph.
    """
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    dynamic = {INPUT_IDS: {0: "batch", 1: "seq_len"}, ATTENTION_MASK: {0: "batch", 1: "seq_len"}}
    dynamic[SMASHED] = {0: "batch", 1: "seq_len"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                str(path),
                input_names=list(wrapper.input_names[:2]),
                output_names=list(wrapper.output_names),
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=False,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - every exporter failure becomes an ExportError
        raise ExportError(f"exporting the split bottom failed: {exc}") from exc
    _weights_as_inputs(Path(path), wrapper.trainable)
