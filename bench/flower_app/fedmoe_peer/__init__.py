"""Flower FedAvg on fedmoe's model and data (the peer of ``bench/bench_vs_flower.py``)."""
