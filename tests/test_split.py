"""Split mode (HO-SFL + ACP-SL): the shared math, the coordinator's top and group against torch and against bad
input, and a real split round over websockets with a first-order device beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import COORD_MIXTRAL, one_round_federation, tiny_checkpoint  # noqa: E402

from coordinator.split_group import Member, SplitGroup  # noqa: E402
from coordinator.split_top import Smashed, SplitTop  # noqa: E402
from device_runtime import acp  # noqa: E402
from device_runtime.errors import UpdateRejected  # noqa: E402
from device_runtime.hosfl import apply_step, projected_scalar, step_seeds  # noqa: E402
from device_runtime.wire import CutGradient, FitConfig, SmashedData, SplitConfig, SplitScalars, SplitStep  # noqa: E402
from device_runtime.zo_directions import perturb_rows  # noqa: E402

CUT = 1


def test_row_directions_are_bit_identical_for_every_holder():
    """A device holding experts (3, 1) and the coordinator holding all 4 regenerate the same rows."""
    full = np.zeros((4, 5, 3), np.float32)
    held = np.zeros((2, 5, 3), np.float32)
    perturb_rows([("layers.0.w", full, range(4))], seed=99, scale=0.5)
    perturb_rows([("layers.0.w", held, (3, 1))], seed=99, scale=0.5)
    assert np.array_equal(held, full[[3, 1]])
    assert set(np.unique(full)) == {-0.5, 0.5}  # rademacher
    other = np.zeros((4, 5, 3), np.float32)
    perturb_rows([("layers.0.v", other, range(4))], seed=99, scale=0.5)
    assert not np.array_equal(other, full)  # the name keys the direction


def test_scalar_estimate_averages_to_the_true_gradient():
    """E[v u] over seeds = d(lambda . f)/d theta for a linear bottom f = W theta (unbiased, Rademacher u)."""
    rng = np.random.default_rng(0)
    weight, lam = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    theta = rng.normal(size=(2, 4)).astype(np.float32)
    true = (weight.T @ lam).reshape(2, 4)
    total, mu, seeds = np.zeros((2, 4)), 1e-2, 4000
    for seed in range(seeds):
        u = np.zeros((2, 4), np.float32)
        perturb_rows([("w", u, (0, 1))], seed, 1.0)
        v = projected_scalar(lam, weight @ (theta + mu * u).ravel(), weight @ theta.ravel(), mu)
        total += v * u
    error = np.linalg.norm(total / seeds - true) / np.linalg.norm(true)
    assert error < 0.1, error  # the estimate's variance ~ d |g|^2 / n: 8 / 4000 -> ~5% expected


def test_apply_step_is_the_mean_over_perturbations():
    a, b = np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32)
    apply_step([("w", a, (0,))], (5, 6), (2.0, -4.0), 0.1)
    perturb_rows([("w", b, (0,))], 5, -0.1 * 2.0 / 2)
    perturb_rows([("w", b, (0,))], 6, 0.1 * 4.0 / 2)
    assert np.array_equal(a, b)
    assert step_seeds(0, 1, 2, 2) == step_seeds(0, 1, 2, 2) != step_seeds(0, 1, 3, 2)


def test_channel_means_agree_and_fill():
    rng = np.random.default_rng(1)
    device, coordinator = acp.ChannelMeans(6), acp.ChannelMeans(6)
    for _ in range(3):
        z, mask = rng.normal(size=(2, 4, 6)).astype(np.float32), np.ones((2, 4), np.int32)
        keep = acp.select_channels(z, mask, device, np.ones(6, np.float32), keep_ratio=0.5)
        assert 1 <= keep.size <= 3 and np.all(np.diff(keep) > 0)
        values = z[:, :, keep].astype(np.float16)
        device.update(values, keep, mask)
        coordinator.update(values, keep, mask)
        filled = coordinator.fill(values.astype(np.float32), keep)
        assert np.array_equal(filled[:, :, keep], values.astype(np.float32))
    assert np.array_equal(device.mean, coordinator.mean)


# ---------------------------------------------------------------- the coordinator's top and group


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Mixtral, its global trainable state, its bottom view and a batch."""
    from export.global_state import global_tensor_names, load_trainable_model
    from export.split_graph import split_model

    root = tiny_checkpoint(tmp_path_factory.mktemp("split") / "ckpt", COORD_MIXTRAL)
    model = load_trainable_model(root, trainable_mode="experts", lora_rank=0, seed=0)
    names = set(global_tensor_names(model))
    params = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
    bottom, _ = split_model(model, CUT)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        z = bottom(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return root, model, params, z, mask, labels, ids


def test_cut_gradient_equals_autograd_of_the_whole_model(tiny):
    """lambda_i from one batched top step over two devices = d L_i / d z of the whole model (per device)."""
    from export.training_graph import causal_lm_loss, select_targets

    root, model, params, z, mask, labels, ids = tiny
    top = SplitTop(root, params, cut_layer=CUT, learning_rate=0.0)
    devices = [Smashed(z[i : i + 1].numpy(), mask[i : i + 1].numpy(), labels[i : i + 1].numpy()) for i in range(2)]
    result = top.step(devices)
    captured = {}

    def keep(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden.retain_grad()
        captured["z"] = hidden

    for i in range(2):
        hook = model.model.layers[CUT - 1].register_forward_hook(keep)
        out = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], use_cache=False)
        hook.remove()
        logits, targets = select_targets(out.logits, labels[i : i + 1])
        causal_lm_loss(logits, targets).backward()
        np.testing.assert_allclose(result.gradients[i], captured["z"].grad.numpy(), atol=1e-6, rtol=1e-4)
        model.zero_grad()


def _smashed(batch, *, step=0, update_id="u1", **tensors):
    z, mask, labels = batch
    base = {
        "smashed": z.numpy().astype(np.float16),
        "attention_mask": mask.numpy().astype(np.int32),
        "labels": labels.numpy().astype(np.int32),
    }
    return SmashedData(update_id=update_id, round_id=1, step=step, tensors={**base, **tensors})


def _group(tiny, members=("u1",), steps=3):
    root, _, params, *_ = tiny
    split = SplitConfig(CUT, learning_rate=1e-3)
    config = FitConfig(batch_size=4, seq_len=8, local_steps=steps, split=split)
    top = SplitTop(root, params, cut_layer=CUT, learning_rate=1e-3)
    return SplitGroup(1, config, top, [Member(u, f"d-{u}", ((0, 2),)) for u in members], vocab_size=32)


def test_bad_input_gets_an_error_and_changes_nothing(tiny):
    _, _, _, z, mask, labels, _ = tiny
    group = _group(tiny)
    before = {n: a.copy() for n, a in group.top.bottom.items()}
    nan = z.numpy().astype(np.float16)
    nan[0, 0, 0] = np.nan
    bad = [
        _smashed((z, mask, labels), smashed=nan),  # NaN
        _smashed((z, mask, labels), smashed=z.numpy()[:, :, :3].astype(np.float16)),  # wrong hidden size
        _smashed((z, mask, labels), labels=np.full((2, 5), 999, np.int32)),  # labels outside the vocabulary
        _smashed((z, mask, labels), attention_mask=np.full((2, 5), 2, np.int32)),  # not a 0/1 mask
        _smashed((z, mask, labels), step=2),  # a device that skips steps
        _smashed((z, mask, labels), update_id="stranger"),
    ]
    for msg in bad:
        with pytest.raises(UpdateRejected):
            group.on_smashed(msg.update_id, msg)
    with pytest.raises(UpdateRejected):  # scalars before any top pass
        group.on_scalars("u1", SplitScalars(update_id="u1", round_id=1, step=0, scalars=(1.0, 2.0)))
    ((_, grad),) = group.on_smashed("u1", _smashed((z, mask, labels)))
    assert isinstance(grad, CutGradient) and grad.tensors["gradient"].shape == tuple(z.shape)
    for scalars in ((1.0,), (1.0, float("nan")), (1.0, 2.0, 3.0)):  # P = 2 scalars, finite
        with pytest.raises(UpdateRejected):
            group.on_scalars("u1", SplitScalars(update_id="u1", round_id=1, step=0, scalars=scalars))
    assert group.step == 0 and all(np.array_equal(a, before[n]) for n, a in group.top.bottom.items())
    ((_, done),) = group.on_scalars("u1", SplitScalars(update_id="u1", round_id=1, step=0, scalars=(1.0, -2.0)))
    assert isinstance(done, SplitStep) and done.scalars == ((1.0, -2.0),) and group.step == 1


def test_a_device_that_missed_steps_catches_up_from_the_history(tiny):
    """Two members; b drops after step 0, the group goes on with a; b comes back with step 0's smashed data and
    gets the history of the steps it missed; its replayed bottom equals the coordinator's copy bit for bit."""
    _, _, _, z, mask, labels, _ = tiny
    group = _group(tiny, members=("a", "b"))
    bottom0 = {n: a.copy() for n, a in group.top.bottom.items()}
    assert group.on_smashed("a", _smashed((z, mask, labels), update_id="a")) == []  # waits for b
    replies = group.on_smashed("b", _smashed((z, mask, labels), update_id="b"))
    assert {u for u, m in replies} == {"a", "b"} and all(isinstance(m, CutGradient) for _, m in replies)
    group.on_scalars("a", SplitScalars(update_id="a", round_id=1, step=0, scalars=(0.5, 0.25)))
    group.on_scalars("b", SplitScalars(update_id="b", round_id=1, step=0, scalars=(1.5, 0.75)))
    assert group.history == [(1.0, 0.5)]
    assert group.drop("b") == []
    group.on_smashed("a", _smashed((z, mask, labels), update_id="a", step=1))  # runs at once: b is gone
    group.on_scalars("a", SplitScalars(update_id="a", round_id=1, step=1, scalars=(2.0, -1.0)))
    ((who, history),) = group.on_smashed("b", _smashed((z, mask, labels), update_id="b", step=1))
    assert who == "b" and isinstance(history, SplitStep) and history.first_step == 1
    assert history.scalars == ((2.0, -1.0),)
    replica = {n: a.copy() for n, a in bottom0.items()}  # what device b holds, replayed
    for step, vbar in enumerate(group.history):
        views = [(n, a[r : r + 1], [r]) for n, a in replica.items() for r in (0, 2)]
        apply_step(views, step_seeds(0, 1, step, 2), vbar, 1e-3)
    for name, array in group.top.bottom.items():
        assert np.array_equal(array[[0, 2]], replica[name][[0, 2]])
        assert np.array_equal(array[[1, 3]], bottom0[name][[1, 3]])  # rows no member held never move


# ---------------------------------------------------------------- a real round


def _device(env, url, name, data, backend, memory):
    subprocess.run(
        [sys.executable, "-m", "device_runtime.cli", "enroll", url, "--name", name, "--memory-mib", memory],
        env={**env, "FEDMOE_DEVICE_HOME": str(env["HOME_" + name])},
        check=True,
        capture_output=True,
        timeout=60,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "device_runtime.cli", "run", url, "--data", str(data), "--threads", "1"]
        + ["--memory-mib", memory, "--max-message-mib", "4", "--backend", backend],
        env={**env, "FEDMOE_DEVICE_HOME": str(env["HOME_" + name])},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_split_device_and_a_first_order_device_complete_a_round_over_websockets(tmp_path):
    """A real coordinator on port 0, two real device processes: one ``--backend split`` (HO-SFL steps over the
    authenticated session), one first-order; the round aggregates both, the split device's update holds the
    bottom rows it held and the whole top."""
    fit = {"batch_size": 2, "seq_len": 8, "local_steps": 3, "eval_fraction": 0.0}
    with one_round_federation(
        tmp_path, max_message_mib=4.0, fit=fit, split={"cut_layer": CUT}, min_fit_clients=2, max_fit_clients=2
    ) as (server, registry, data, memory):
        env = {**os.environ}
        devices = []
        for name, backend in (("pi-split", "split"), ("laptop", "ort-training")):
            env["HOME_" + name] = str(tmp_path / name)
            env["FEDMOE_ENROLL_TOKEN"] = registry.create_enroll_token(name, 600)
            devices.append(_device(env, server.url, name, data, backend, memory))
        try:
            deadline = time.monotonic() + 120
            while all(r.status == "running" for r in registry.list_rounds()):
                if time.monotonic() > deadline or any(d.poll() is not None for d in devices):
                    dead = [d.communicate()[1][-3000:] for d in devices if d.poll() is not None]
                    pytest.fail("no round ended: " + " | ".join(dead))
                time.sleep(0.2)
            (round_,) = registry.list_rounds()
            assert round_.status == "finished", round_.metrics
            updates = {u.device_id: u for u in registry.accepted_updates(round_.id)}
            assert len(updates) == 2
            split = next(u for u in updates.values() if "split_top_loss" in u.meta["metrics"])
            assert split.meta["shape_key"] == f"split-cut{CUT}" and split.num_examples == 6
            assert [len(ids) for ids in split.meta["expert_ids"]][CUT:] == [4] * (2 - CUT)  # the whole top
        finally:
            for device in devices:
                device.send_signal(signal.SIGTERM)
            logs = [d.communicate(timeout=30)[1] for d in devices]
        assert all(d.returncode == 0 for d in devices), logs[0][-3000:]


def test_the_strategy_gives_a_split_device_its_bottom_and_split_settings():
    """A device whose profile names the split backend gets the experts below the cut, FitConfig.split, no held-out
    evaluation and no seed-and-scalar upload; its shape key names the cut (the bundle is a bottom)."""
    from test_zo_planning import SMOLLM2_8L

    from coordinator.strategy import ClientInfo, from_name
    from coordinator.strategy.types import FitContext
    from device_runtime.stats import RoutingStats

    calibration = RoutingStats([4] * 8)
    calibration.update([np.stack([np.full(4, 2.5), np.full(4, 0.5), np.full(4, -3.0), np.full(4, 5.0)])] * 8, 10)
    split = SplitConfig(cut_layer=2, keep_ratio=0.25)
    fit = FitConfig(batch_size=4, seq_len=64, eval_fraction=0.1, zo_seeds=16)
    context = FitContext(SMOLLM2_8L, calibration, fit, split=split)
    strategy = from_name("hfedmoe").bind(context)
    pi = ClientInfo("pi", {"memory_mib": 1536, "gflops": 5.0, "backend": "split"})
    laptop = ClientInfo("laptop", {"memory_mib": 8192, "gflops": 40.0})
    fits = strategy.configure_fit(1, {}, [pi, laptop])
    assert len(fits["pi"].expert_ids) == 2 and len(fits["laptop"].expert_ids) == 8
    config = fits["pi"].config
    assert config.split == split and config.eval_fraction == 0 and config.zo_seeds == 0
    assert fits["pi"].shape_key.cut_layer == 2 and fits["laptop"].shape_key.cut_layer == 0
    assert fits["laptop"].config.split is None
    no_split = from_name("hfedmoe").bind(FitContext(SMOLLM2_8L, calibration, fit))
    assert "pi" not in no_split.configure_fit(1, {}, [pi, laptop])  # no [split]: the split device sits out


def test_the_top_is_reset_between_rounds_not_reloaded(tiny):
    root, _, params, *_ = tiny
    top = SplitTop(root, params, cut_layer=CUT, learning_rate=1e-3)
    moved = {n: v + 1.0 for n, v in params.items()}
    top.reset(moved, learning_rate=1e-3)
    for name, value in top.tensors().items():
        assert np.array_equal(value, moved[name]), name
    assert not top.optimizer.state  # a fresh AdamW
