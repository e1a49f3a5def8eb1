"""FedMoE (Mei et al., "FedMoE: Personalized Federated Learning via Heterogeneous Mixture of Experts",
arXiv 2408.11304, 2024), server-side aggregation of the clients' expert subsets:

- an expert held by no client keeps its global weights;
- an expert held by exactly one client takes that client's copy;
- an expert shared by several clients is their average, weighted by num_examples.

Router rows and unindexed tensors follow the same rule. On our data model this rule coincides with
sparse FedAvg (each row averaged over its holders); the class exists so that rounds can be labelled with
the algorithm they run, and ``tests/test_strategy_fedmoe.py`` checks each of the three cases.
"""

from __future__ import annotations

from coordinator.strategy.fedavg import FedAvg


class FedMoE(FedAvg):
    """Unheld experts unchanged, single holders copied, shared experts averaged."""

    name = "fedmoe"
