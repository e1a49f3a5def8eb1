"""Flower ClientApp: trains the peer model on this SuperNode's device file (node config ``data-file``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_peer.task import fit, load_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    torch.set_num_threads(int(cfg["threads"]))
    checkpoint = Path(str(cfg["moe-checkpoint"]))
    model, params = load_model(str(cfg["model"]), checkpoint, int(cfg["num-layers"]))
    with torch.no_grad():
        for name, value in msg.content["arrays"].to_torch_state_dict().items():
            params[name].copy_(value)
    server_round = int(msg.content["config"]["server-round"])
    examples, loss = fit(
        model,
        params,
        Path(str(context.node_config["data-file"])),
        checkpoint / "tokenizer.json",
        steps=int(cfg["local-steps"]),
        batch_size=int(cfg["batch-size"]),
        seq_len=int(cfg["seq-len"]),
        learning_rate=float(cfg["learning-rate"]),
        aux_loss_coef=float(cfg["aux-loss-coef"]),
        seed=int(cfg["seed"]) + server_round,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict((n, p.detach()) for n, p in params.items())),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)
