"""Shared pieces of the strategies: validation, the streaming accumulator, registry, failures as data."""

import numpy as np
import pytest
from helpers import OTHER, make_update, memory_for, routing, tiny_context, tiny_global
from safetensors.numpy import load_file, save_file

from coordinator.strategy import (
    STRATEGIES,
    ClientInfo,
    ClientUpdate,
    FedAvg,
    FitIns,
    HFedMoE,
    StreamingAggregation,
    TensorRole,
    TensorSpec,
    from_name,
    validate_update,
)
from device_runtime.errors import ConfigError, UpdateRejected
from device_runtime.stats import RoutingStats
from device_runtime.wire import FitConfig


def good_update(cid="a"):
    return make_update(cid, 2, (0, 1), [[1, 2], [3, 4]], [[1, 0], [0, 1]], [1, 1])


def _replace_tensor(update, name, value):
    return ClientUpdate(**{**update.__dict__, "tensors": {**update.tensors, name: value}})


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda u: _replace_tensor(u, "experts.w", np.zeros((3, 2), np.float32)), "experts.w"),
        (lambda u: _replace_tensor(u, "experts.w", np.zeros((2, 3), np.float32)), "expected (2, 2)"),
        (lambda u: _replace_tensor(u, "attn.w", np.zeros(3, np.float32)), "attn.w"),
        (lambda u: _replace_tensor(u, "gate.weight", np.array([[np.nan, 0], [0, 0]], np.float32)), "NaN"),
        (lambda u: _replace_tensor(u, "attn.w", np.array([1, 2], np.int64)), "floating-point"),
        (
            lambda u: ClientUpdate(
                **{
                    **u.__dict__,
                    "tensors": {**u.tensors, "bogus": np.zeros(2, np.float32)},
                    "tensor_meta": {**u.tensor_meta, "bogus": OTHER},
                }
            ),
            "not in the global model",
        ),
        (lambda u: ClientUpdate(**{**u.__dict__, "expert_ids": ((0, 7),)}), "[0, 4)"),
        (lambda u: ClientUpdate(**{**u.__dict__, "expert_ids": ((1, 1),)}), "distinct"),
        (lambda u: ClientUpdate(**{**u.__dict__, "trained_experts": (frozenset({3}),)}), "trained experts"),
        (lambda u: ClientUpdate(**{**u.__dict__, "num_examples": 0}), "num_examples"),
        (lambda u: ClientUpdate(**{**u.__dict__, "routing": (routing(3),)}), "routing usage"),
        (lambda u: ClientUpdate(**{**u.__dict__, "routing": ()}), "different numbers of layers"),
    ],
)
def test_garbage_is_rejected_with_a_reason(mutate, needle):
    with pytest.raises(UpdateRejected) as info:
        validate_update(mutate(good_update()), tiny_global())
    assert needle in info.value.reason and "'a'" in info.value.reason


def test_rejected_update_leaves_the_accumulator_untouched_and_duplicates_are_refused():
    params = tiny_global()
    agg = StreamingAggregation(params, FedAvg().row_weights)
    bad = _replace_tensor(good_update("b"), "experts.w", np.zeros((2, 5), np.float32))
    with pytest.raises(UpdateRejected):
        agg.accumulate(bad)
    agg.accumulate(good_update("a"))
    with pytest.raises(UpdateRejected, match="more than one update"):
        agg.accumulate(good_update("a"))
    out = agg.finish()
    np.testing.assert_array_equal(out["experts.w"], [[1, 2], [3, 4], [20, 20], [30, 30]])
    assert agg.num_clients == 1 and agg.num_examples == 2


REQUIRED = {"dp-fedavg": {"privacy": {"noise_multiplier": 1.0, "clip": 1.0, "seed": 0}}}  # seeded: same noise


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_failures_and_garbage_do_not_crash_a_round(name):
    params = tiny_global()
    strategy = from_name(name, **REQUIRED.get(name, {}))
    out, metrics, _ = strategy.aggregate_fit(1, [], [("x", "timeout")], params)
    assert all(out[k] is params[k] for k in params)
    assert metrics["num_failures"] == 1 and metrics["failures"] == {"x": "timeout"}

    garbage = _replace_tensor(good_update("bad"), "experts.w", np.zeros((9, 9), np.float32))
    with_garbage, metrics, _ = strategy.aggregate_fit(2, [good_update("a"), garbage], [("x", "oom")], params)
    clean, _, _ = from_name(name, **REQUIRED.get(name, {})).aggregate_fit(2, [good_update("a")], [], params)
    assert set(metrics["rejected"]) == {"bad"} and metrics["num_failures"] == 2 and metrics["num_clients"] == 1
    for key in params:
        np.testing.assert_array_equal(with_garbage[key], clean[key])


def _direct_fedavg(params, updates):
    """Reference: stack every client's full-size rows and average each row over its holders."""
    out = {}
    for name, ref in params.items():
        if name == "attn.w":
            n = np.array([u.num_examples for u in updates], np.float64)
            out[name] = sum(w * u.tensors[name] for w, u in zip(n, updates)) / n.sum()
            continue
        sums, totals = np.zeros(ref.shape), np.zeros(ref.shape[0])
        for u in updates:
            for local, g in enumerate(u.expert_ids[0]):
                sums[g] += u.num_examples * u.tensors[name][local]
                totals[g] += u.num_examples
        out[name] = np.where(totals[:, None] > 0, sums / np.maximum(totals, 1)[:, None], ref)
    return out


def _random_updates(rng, count):
    updates = []
    for c in range(count):
        ids = tuple(sorted(rng.choice(4, size=int(rng.integers(1, 4)), replace=False).tolist()))
        k = len(ids)
        updates.append(
            make_update(
                f"c{c}",
                int(rng.integers(1, 50)),
                ids,
                rng.normal(size=(k, 2)),
                rng.normal(size=(k, 2)),
                rng.normal(size=2),
            )
        )
    return updates


def test_streaming_from_files_equals_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    params = tiny_global()
    updates = _random_updates(rng, 5)
    for u in updates:
        save_file(dict(u.tensors), str(tmp_path / f"{u.client_id}.safetensors"))

    def reread():  # the coordinator's stored updates, read back one at a time
        for u in updates:
            yield ClientUpdate(**{**u.__dict__, "tensors": load_file(str(tmp_path / f"{u.client_id}.safetensors"))})

    streamed, metrics, _ = FedAvg().aggregate_fit(1, reread, [], params)
    direct = _direct_fedavg(params, updates)
    for name in params:
        np.testing.assert_allclose(streamed[name], direct[name], rtol=1e-6, atol=1e-6)
        assert streamed[name].dtype == np.float32
    assert metrics["num_clients"] == 5


def test_non_leading_expert_axis():
    params = {"w": np.zeros((2, 3), np.float32), "g": np.zeros((3, 2), np.float32)}
    meta = {
        "w": TensorSpec("w", (2, 3), layer=0, expert_axis=1, role=TensorRole.EXPERT),
        "g": TensorSpec("g", (3, 2), layer=0, expert_axis=0, role=TensorRole.ROUTER),
    }

    def update(cid, n, ids, w):
        return ClientUpdate(
            cid,
            n,
            {"w": np.asarray(w, np.float32), "g": np.ones((len(ids), 2), np.float32)},
            meta,
            (ids,),
            (frozenset(ids),),
            (routing(len(ids)),),
        )

    out, _, _ = FedAvg().aggregate_fit(
        1, [update("a", 1, (0, 2), [[1, 2], [3, 4]]), update("b", 3, (2,), [[6], [8]])], [], params
    )
    # expert 0 from a only; expert 2: (1*2 + 3*6)/4 = 5 and (1*4 + 3*8)/4 = 7; expert 1 unchanged
    np.testing.assert_allclose(out["w"], [[1, 0, 5], [3, 0, 7]])


def test_registry():
    assert sorted(STRATEGIES) == [
        "dense-fedavg",
        "dp-fedavg",
        "fedadam",
        "fedalign",
        "fedavg",
        "fedmoe",
        "fedprox",
        "fedyogi",
        "hfedmoe",
    ]
    import coordinator.strategy as package

    assert {cls.__name__ for cls in STRATEGIES.values()} <= set(package.__all__)  # each importable by its name
    context = tiny_context()
    clients = [ClientInfo(c, {"memory_mib": memory_for(context, 2)}) for c in ("a", "b")]
    fits = from_name("fedprox", prox_mu=0.1).bind(context).configure_fit(3, tiny_global(), clients)
    expected = FitConfig(batch_size=2, seq_len=8, prox_mu=0.1, seed=7 + 3)
    assert fits == {c: FitIns(((0, 1),), expected) for c in ("a", "b")}
    assert fits["a"].shape_key.prox and fits["a"].shape_key.experts_per_layer == (2,)
    with pytest.raises(ConfigError, match="unknown strategy"):
        from_name("fedsgd")
    with pytest.raises(ConfigError, match="fedavg"):
        from_name("fedavg", tau=0.3)
    with pytest.raises(ConfigError):
        from_name("fedprox", prox_mu=-1)


def test_configure_fit_sizes_by_budget_ranks_by_importance_and_leaves_out_who_cannot_fit(caplog):
    context = tiny_context()
    clients = [
        ClientInfo("two", {"memory_mib": memory_for(context, 2)}),
        ClientInfo("three", {"memory_mib": memory_for(context, 3), "gflops": 5.0}),
        ClientInfo("tiny", {"memory_mib": 1.0}),
        ClientInfo("no-profile", {}),
    ]
    fits = FedAvg().bind(context).configure_fit(1, tiny_global(), clients)
    # lam 0.5: I = (.45, .5, .45, .25); ties go to the lower id
    assert {c: f.expert_ids for c, f in fits.items()} == {"two": ((0, 1),), "three": ((0, 1, 2),)}
    assert (
        "tiny sits out round 1: BudgetError" in caplog.text
        and "no-profile sits out round 1: ConfigError" in caplog.text
    )
    assert HFedMoE(lam=0.3).bind(context).configure_fit(1, {}, clients[:1])["two"].expert_ids == ((1, 2),)
    # the client's own statistics (over experts 2 and 3, all mass on 3) replace the calibration's there
    own = RoutingStats([2], [[2, 3]])
    own.update([np.array([[0.0, 10.0], [0.0, 1.0], [0.0, 0.0], [0.0, 10.0]])], 10)
    fits = FedAvg().bind(context).configure_fit(1, {}, [ClientInfo("two", clients[0].profile, own)])
    assert fits["two"].expert_ids == ((1, 3),)


def test_dense_fedavg_gives_every_expert_or_lets_the_client_sit_out():
    context = tiny_context()
    clients = [
        ClientInfo("all", {"memory_mib": memory_for(context, 4)}),
        ClientInfo("three", {"memory_mib": memory_for(context, 3)}),
        ClientInfo("tiny", {"memory_mib": 1.0}),
    ]
    fits = from_name("dense-fedavg").bind(context).configure_fit(1, tiny_global(), clients)
    assert {c: f.expert_ids for c, f in fits.items()} == {"all": ((0, 1, 2, 3),)}
    assert fits["all"].config == FitConfig(batch_size=2, seq_len=8, seed=8)


def test_configure_fit_needs_a_bound_strategy_and_the_seed_follows_the_server_round():
    with pytest.raises(ConfigError, match="not bound"):
        FedAvg().configure_fit(1, {}, [ClientInfo("a", {"memory_mib": 1e6})])
    strategy = FedAvg().bind(tiny_context(learning_rate=0.5))
    assert strategy.fit_config(2) == FitConfig(batch_size=2, seq_len=8, learning_rate=0.5, seed=9)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_evaluate_weights_by_examples_and_averages_each_metric_over_its_reporters(name):
    """Flower's aggregate_evaluate: loss = sum n_c loss_c / sum n_c; accuracy only over the clients that computed
    it; a result without examples counts as a failure (hand-computed values)."""
    from coordinator.strategy import ClientEvaluation

    strategy = from_name(name, **REQUIRED.get(name, {}))
    results = [
        ClientEvaluation("a", loss=2.0, num_examples=3, metrics={"accuracy": 0.5, "num_tokens": 30}),
        ClientEvaluation("b", loss=1.0, num_examples=1, metrics={"num_tokens": 10}, shape_key="experts-1.1"),
        ClientEvaluation("c", loss=9.0, num_examples=0),
    ]
    loss, metrics = strategy.aggregate_evaluate(2, results, [("d", "timed out")])
    assert loss == pytest.approx((3 * 2.0 + 1 * 1.0) / 4)  # 1.75
    assert metrics == pytest.approx(
        {"accuracy": 0.5, "num_tokens": (3 * 30 + 10) / 4, "num_clients": 2, "num_examples": 4, "num_failures": 2}
    )
    assert strategy.aggregate_evaluate(2, [], [("d", "timed out")]) == (
        None,
        {"num_clients": 0, "num_examples": 0, "num_failures": 1},
    )

    seen = []

    def accuracy_only(pairs):
        seen.extend(pairs)
        return {"accuracy": sum(n * m.get("accuracy", 0.0) for n, m in pairs) / sum(n for n, _ in pairs)}

    strategy.evaluate_metrics_aggregation_fn = accuracy_only
    loss, metrics = strategy.aggregate_evaluate(2, results[:2], [])
    assert loss == pytest.approx(1.75) and metrics["accuracy"] == pytest.approx(3 * 0.5 / 4)
    assert "num_tokens" not in metrics and seen == [(3, {"accuracy": 0.5, "num_tokens": 30}), (1, {"num_tokens": 10})]
    assert type(strategy).evaluate_metrics_aggregation_fn is None  # set on the instance only
