"""The torch reference of a federation (``--compare torch-hfedmoe``): the system's own algorithm in one process.

Each round does what the coordinator and the devices do, built from the same parts, with ONNX Runtime replaced by
torch autograd on the module the device graph is exported from:

- selection: the strategy's own ``configure_fit``, each device seen as the coordinator sees it (its simulated
  profile and the routing statistics of its last update);
- the device's model: ``export.prune`` of the global model to its assigned experts, the others frozen if the
  assignment says so (what its bundle holds);
- local training: :class:`~export.training_graph.TrainingWrapper` (the exported objective: cross-entropy with the
  answer shift, load balancing, FedAlign-MoE's routing KL, FedProx) and torch AdamW with ORT's settings (eps 1e-8,
  weight decay 0.01, ``docs/stack.md``), on the batches the device draws (``fit_round.round_dataset``: the same
  held-out split, ``FitConfig.eval_fraction``, left out, batches seeded with the round's ``FitConfig.seed``),
  AdamW's moments carried from the device's previous round where the system's device keeps its trainer
  (``device_runtime.trainer_cache``), fresh otherwise. The device's rule is about its memory at run
  time (``VmData`` + 8 copies of the update within the budget); :func:`keeps_trainer` is its outcome measured in the
  default mix: in LoRA mode every device keeps its trainer, with full experts only a device holding every expert;
- the update: the trainable tensors, the routing statistics (``RoutingStats``) and the trained experts, turned into
  a strategy ``ClientUpdate`` by the coordinator's own ``to_client_update``;
- aggregation: the strategy's own ``aggregate_fit``, updates in device order; scoring: the coordinator's
  ``Evaluator``.

So a gap between this and the system is an implementation defect, and a gap between this and ``centralized`` is
the algorithm's (``tests/test_reference_parity.py`` checks one round of both against each other).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.simulation.report import DeviceRound, RoundRecord, experts_label
from coordinator.strategy.types import ClientInfo, ClientUpdate, FitIns, Params
from device_runtime.answer_prior import local_answer_shift
from device_runtime.errors import ConfigError
from device_runtime.fit_round import local_prior, round_dataset
from device_runtime.modes import SPLIT_BACKEND, TrainableMode
from device_runtime.shape_key import held_experts
from device_runtime.stats import RoutingStats

PREFIX = "torch-"


def is_reference(name: str) -> bool:
    """Whether a ``--compare`` name asks for the torch reference of a strategy (``torch-<strategy>``)."""
    return name.startswith(PREFIX)


@dataclass
class ReferenceDevice:
    """One simulated device as the reference holds it: its data, its last routing statistics, its optimizer."""

    name: str
    profile: dict
    data_file: Path
    routing: RoutingStats | None = None
    optimizer_state: tuple | None = field(default=None, repr=False)  # (shape key, torch optimizer state)


def keeps_trainer(ins: FitIns, num_experts: int) -> bool:
    """Whether the system's device would keep its trainer (and AdamW's moments) for ``ins``: see the module
    docstring."""
    return ins.trainable_mode == TrainableMode.LORA or all(len(ids) == num_experts for ids in ins.expert_ids)


def fit_device(
    model,
    global_params: Params,
    ins: FitIns,
    device: ReferenceDevice,
    tokenizer: Path,
    *,
    carry_optimizer: bool = False,
) -> ClientUpdate:
    """One device's round in torch: prune, train ``ins.config.local_steps`` steps (0: one epoch), report (see the
    module docstring).

    Args:
        model: the full global torch model of the federation's layout (``load_trainable_model``); its trainable
            tensors are overwritten with ``global_params``.
        carry_optimizer: start from the AdamW state of the device's previous round on the same shape key.
    Raises:
        DataError: the device's data file holds no training record.
    """
    import math

    from coordinator.planning import to_client_update
    from export.families import describe

    cfg = ins.config
    load_params(model, global_params)
    wrapper, federated, ids = _device_model(model, ins)
    held = held_experts(ids, describe(model).num_experts, ins.frozen_dtype is not None)
    optimizer = _optimizer(
        wrapper,
        [n for n, _ in federated],
        cfg.learning_rate,
        device.optimizer_state[1]
        if carry_optimizer and device.optimizer_state is not None and device.optimizer_state[0] == ins.shape_key
        else None,
    )
    dataset = round_dataset(device.data_file, tokenizer, cfg)
    constants = dict(
        aux_loss_coef=cfg.aux_loss_coef,
        routing_reg_coef=cfg.routing_reg_coef,
        routing_priors=local_prior(cfg, describe(model).num_experts, held),
        prox_mu=cfg.prox_mu,
    )
    answer = local_answer_shift(dataset, cfg.labels, cfg.logit_adjustment)
    if answer is not None:
        constants.update(answer_ids=answer[0], answer_bias=answer[1])
    steps = cfg.local_steps or math.ceil(len(dataset.train) / cfg.batch_size)
    routing, losses, examples = _train(
        wrapper,
        optimizer,
        dataset.train_batches(cfg.batch_size),
        steps,
        constants,
        RoutingStats(tuple(map(len, held)), held),
    )
    device.optimizer_state = (ins.shape_key, optimizer.state_dict()) if carry_optimizer else None
    device.routing = routing
    trained = [
        [layer[i] for i in local if i < len(keep)] for layer, local, keep in zip(held, routing.trained_experts(), ids)
    ]
    meta = {
        "expert_ids": [list(layer) for layer in ids],
        "trained_experts": trained,
        "routing": routing.to_dict(),
        "metrics": {"loss": float(np.mean(losses))},
        "layers": dict(federated),
        "frozen_ids": [list(h[len(keep) :]) for h, keep in zip(held, ids)],
    }
    params = dict(wrapper.named_parameters())
    return to_client_update(device.name, examples, meta, {n: params[n].detach().numpy().copy() for n, _ in federated})


def _device_model(model, ins: FitIns):
    """``(TrainingWrapper of the pruned model, [(trainable name, MoE layer)], trained expert ids)``: what the
    device's bundle holds for ``ins`` (the experts it does not train frozen, if ``ins.frozen_dtype``), with only the
    federated tensors requiring gradients."""
    from export.families import describe
    from export.prune import prune
    from export.training_graph import TrainingWrapper

    pruned, ids = prune(model, ins.expert_ids, ins.frozen_dtype, ins.merged)
    federated = describe(pruned).trainable_tensors(list(pruned.state_dict()), ins.trainable_mode)
    names = {n for n, _ in federated}
    wrapper = TrainingWrapper(pruned, prox=ins.config.prox_mu > 0, trainable=[n for n, _ in federated])
    for name, param in wrapper.named_parameters():
        param.requires_grad_(name in names)
    return wrapper, federated, ids


def _optimizer(wrapper, names: list[str], learning_rate: float, state: dict | None):
    """torch AdamW over ``names`` with the device graph's eps and weight decay, continuing ``state`` if given."""
    import torch

    from export.artifacts import ADAMW_EPS, ADAMW_WEIGHT_DECAY

    params = dict(wrapper.named_parameters())
    optimizer = torch.optim.AdamW(
        [params[n] for n in names], lr=learning_rate, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY
    )
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer


def _train(wrapper, optimizer, batches, steps: int, constants: dict, routing: RoutingStats):
    """``steps`` optimizer steps, the routing statistics of each step's forward added to ``routing``.

    Returns:
        ``(routing, loss of each step, examples seen)``.
    """
    import torch

    losses, examples = [], 0
    wrapper.train()
    for _, batch in zip(range(steps), batches):
        inputs = wrapper.make_inputs(
            *(torch.from_numpy(a) for a in (batch.input_ids, batch.attention_mask, batch.labels)), **constants
        )
        outputs = wrapper(*inputs.values())  # (loss, ce, routing_stats_0..L-1, num_tokens)
        optimizer.zero_grad()
        outputs[0].backward()
        optimizer.step()
        losses.append(float(outputs[0].detach()))
        routing.update([o.detach().numpy() for o in outputs[2:-1]], int(outputs[-1]))
        examples += batch.num_examples
    return routing, losses, examples


def load_params(model, params: Params) -> None:
    """Copy the global state's tensors (name -> array) into ``model``'s parameters of the same names."""
    import torch

    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def global_routing(model, global_params: Params, cfg, device: ReferenceDevice, tokenizer: Path) -> RoutingStats:
    """The device's routing statistics over EVERY expert under the current global model, on the batches it is
    about to train on (HFedMoE's data-driven selection, arXiv 2601.00583 Eq. 15: what a device holding all experts
    resident would report). The same sums as the training graph's ``routing_stats`` outputs.
    """
    import torch

    from export.families import describe
    from export.moe_block import routing_outputs
    from export.training_graph import routing_stats, routing_sums

    load_params(model, global_params)
    layers = describe(model).layers
    stats = RoutingStats(
        tuple(layer.num_experts for layer in layers), tuple(tuple(range(layer.num_experts)) for layer in layers)
    )
    dataset = round_dataset(device.data_file, tokenizer, cfg)
    model.eval()
    with torch.no_grad(), routing_outputs(model) as routed:
        for _, batch in zip(range(cfg.local_steps), dataset.train_batches(cfg.batch_size)):
            mask = torch.from_numpy(batch.attention_mask)
            routed.clear()
            model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=mask)
            valid = mask.reshape(-1, 1).to(torch.float32)
            sums = [routing_stats(*routing_sums(logits, top, valid)).numpy() for logits, _, top in routed]
            stats.update(sums, int(mask.sum()))
    return stats


def run_reference(
    fed, out: Path, test: list[dict], on_round: Callable[[RoundRecord], None], *, threads: int = 2, scores: str = "held"
) -> list[RoundRecord]:
    """Run ``fed`` (a ``runner.Federation`` whose strategy is the one to reproduce) as the torch reference.

    The coordinator's state is made as ``fedmoe-coord init`` makes it (global version 0, calibration), in ``out``.
    ``scores``: the routing statistics each device's selection uses: ``"held"``, those of its last update over the
    experts it held (the system); ``"all"``, :func:`global_routing` over every expert (a lever, not the system).

    Raises:
        FedmoeError: no device gets anything to train. ConfigError: a split device in the fleet (the reference
            trains every device's whole model in torch; split mode's HO-SFL steps are not modelled here).
        ModelError / DataError: as the parts raise.
    """
    import torch

    split = [d.name for d in fed.devices if d.backend == SPLIT_BACKEND]
    if split:
        raise ConfigError(
            f"the torch reference does not model split mode (devices {', '.join(split[:3])}): compare a fleet "
            "without split devices, or drop torch-<strategy> from --compare"
        )

    from coordinator.evaluation import Evaluator
    from coordinator.federation import GlobalModel, fit_context, initialize, tensor_store
    from coordinator.registry import Registry
    from coordinator.simulation.runner import coordinator_config, participants
    from coordinator.strategy import from_name
    from export.global_state import load_trainable_model

    out.mkdir(parents=True, exist_ok=True)
    cfg = coordinator_config(fed, out, port=0)
    initialize(cfg, list(fed.calibration_texts))
    registry = Registry(cfg.registry_url)
    try:
        params = GlobalModel(registry, tensor_store(cfg)).params
    finally:
        registry.close()
    context = fit_context(cfg)
    strategy = from_name(fed.strategy, **cfg.strategy_params).bind(context)
    devices = [
        ReferenceDevice(d.name, {"memory_mib": d.memory_mib, "backend": d.backend}, f)
        for d, f in participants(fed, cfg)
    ]
    torch.manual_seed(fed.seed)
    model = load_trainable_model(
        fed.checkpoint, trainable_mode=fed.trainable_mode, lora_rank=fed.lora_rank, seed=fed.seed
    )
    evaluator = Evaluator(
        fed.checkpoint,
        test,
        trainable_mode=fed.trainable_mode,
        lora_rank=fed.lora_rank,
        seed=fed.seed,
        seq_len=fed.fit.seq_len,
    )
    tokenizer = Path(fed.checkpoint) / "tokenizer.json"
    name, records = PREFIX + fed.strategy, []
    state = strategy.initial_state()
    for server_round in range(1, fed.rounds + 1):
        torch.set_num_threads(threads)  # the evaluator sets its own count
        start = time.monotonic()
        if scores == "all":
            for device in devices:
                device.routing = global_routing(
                    model, params, strategy.fit_config(server_round, state), device, tokenizer
                )
        clients = [ClientInfo(d.name, d.profile, d.routing) for d in devices]
        plan = strategy.configure_fit(server_round, params, clients, state)
        updates = []
        for device in sorted(devices, key=lambda d: d.name):
            if device.name in plan:
                ins = plan[device.name]
                updates.append(
                    fit_device(
                        model,
                        params,
                        ins,
                        device,
                        tokenizer,
                        carry_optimizer=keeps_trainer(ins, context.model.num_experts),
                    )
                )
        params, _, state = strategy.aggregate_fit(server_round, updates, [], params, state)
        wall = time.monotonic() - start
        score = evaluator.score(params)
        rows = tuple(
            DeviceRound(
                device=u.client_id,
                loss=u.metrics.get("loss"),
                bytes_up=0,
                bytes_down=0,
                peak_rss_mib=None,
                experts_kept=max(map(len, u.expert_ids)),
                experts=experts_label(u.expert_ids),
                frozen=plan[u.client_id].shape_key.held_label(context.model.num_experts),
            )
            for u in updates
        )
        records.append(RoundRecord(name, server_round, score.accuracy, score.loss, wall, 0, 0, rows))
        on_round(records[-1])
    return records
