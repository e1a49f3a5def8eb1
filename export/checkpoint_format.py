"""The fedmoe checkpoint format's names (``export.upcycle`` writes and reads it; ``export.planner`` reads its sizes).

An upcycled model of a family transformers has no MoE class for is saved as its dense family's own ``config.json``
plus the object ``config[FEDMOE_KEY] = {"format": FORMAT, "num_experts", "num_experts_per_tok", "norm_topk_prob"}``,
and ``model.safetensors`` holding the state dict (``export.upcycle`` says why and how it loads).
"""

from __future__ import annotations

FEDMOE_KEY = "fedmoe"
FORMAT = 1
