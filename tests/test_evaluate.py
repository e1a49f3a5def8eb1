"""Label log-likelihood scoring: the batched, cached scorer against a plain full-sequence forward per
(prompt, label) pair, and the routed experts forward against the dense-masked one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from helpers import COORD_MIXTRAL, tiny_checkpoint  # noqa: E402

from export.evaluate import _label_scores  # noqa: E402
from export.experts_impl import DENSE_MASKED, ROUTED  # noqa: E402
from export.global_state import load_trainable_model  # noqa: E402
from export.moe_block import set_experts_forward  # noqa: E402


def _reference(model, prompt: list[int], label: list[int]) -> float:
    """sum_j log p(label_j | prompt, label_<j) from one unpadded forward of prompt + label."""
    ids = torch.tensor([prompt + label])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(log_probs[len(prompt) - 1 + j, token]) for j, token in enumerate(label))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("tiny"), COORD_MIXTRAL)
    model = load_trainable_model(checkpoint, trainable_mode="lora", lora_rank=2).eval()
    with torch.no_grad():  # experts and adapters that differ, as after training
        generator = torch.Generator().manual_seed(1)
        for name, param in model.named_parameters():
            if "experts" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 3], [4]]  # different lengths: left padding matters


@pytest.mark.parametrize("labels", [[[5], [9], [12]], [[5, 6, 7], [9], [12, 3]]], ids=["one-token", "multi-token"])
@pytest.mark.parametrize("impl", [DENSE_MASKED, ROUTED])
def test_batched_scores_equal_one_forward_per_pair(model, labels, impl):
    set_experts_forward(model, impl)
    scores, counts = _label_scores(model, PROMPTS, labels)
    assert counts == [len(label) for label in labels]
    expected = [[_reference(model, prompt, label) for label in labels] for prompt in PROMPTS]
    assert [s for row in scores for s in row] == pytest.approx([s for row in expected for s in row], abs=1e-4)
