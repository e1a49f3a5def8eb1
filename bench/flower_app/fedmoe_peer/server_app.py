"""Flower ServerApp: flwr's own FedAvg; each global model scored by fedmoe's ``Evaluator``; per round the
payload bytes down / up, the round's wall time and the score are appended to ``results-file`` (JSON lines)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmoe_peer.task import as_global_state, load_model

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's payload bytes and wall time (configure_train to aggregate_train)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"start": time.monotonic(), "bytes_down": arrays.count_bytes() * len(messages)}
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        row = self.rounds[server_round]
        row["wall_s"] = time.monotonic() - row.pop("start")
        row["bytes_up"] = sum(r.content["arrays"].count_bytes() for r in replies if r.has_content())
        row["clients"] = sum(r.has_content() for r in replies)
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from coordinator.evaluation import Evaluator
    from device_runtime.data import load_records

    cfg = context.run_config
    kind, checkpoint = str(cfg["model"]), Path(str(cfg["moe-checkpoint"]))
    model, params = load_model(kind, checkpoint, int(cfg["num-layers"]))
    initial = ArrayRecord(OrderedDict((n, p.detach().clone()) for n, p in params.items()))
    del model, params
    evaluator = Evaluator(checkpoint, load_records(str(cfg["test-file"])), seq_len=int(cfg["seq-len"]))
    num_experts = evaluator_experts(checkpoint)
    clients = int(cfg["num-clients"])
    strategy = TimedFedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    results = Path(str(cfg["results-file"]))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        score = evaluator.score(as_global_state(kind, arrays.to_torch_state_dict(), num_experts))
        row = {
            "round": server_round,
            "accuracy": score.accuracy,
            "loss": score.loss,
            **strategy.rounds.get(server_round, {}),
        }
        with open(results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return MetricRecord({"accuracy": score.accuracy, "loss": score.loss})

    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg["rounds"]),
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate,
    )


def evaluator_experts(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["num_local_experts"])
