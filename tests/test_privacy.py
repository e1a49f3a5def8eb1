"""Client-level DP (``coordinator.privacy``, strategy ``dp-fedavg``): clipping by hand, the noise's standard
deviation, unheld rows, the accountant against dp-accounting, one adaptive clip step, the epsilon budget
stopping rounds, and the ``[privacy]`` config table. Pure numpy (and dp-accounting); no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import make_update, tiny_global
from scipy import stats

from coordinator.config import CoordinatorConfig, load_config, make_strategy, save_config
from coordinator.privacy import (
    PrivacyConfig,
    accounted_rate,
    adaptive_clip_step,
    clip_factor,
    epsilon,
    noisy_rows,
    value_noise_multiplier,
)
from coordinator.rounds import Aggregate, Finished, RoundEngine, RoundPolicy, StartRound
from coordinator.strategy import DPFedAvg, from_name
from device_runtime.errors import ConfigError


def dp(**kw) -> DPFedAvg:
    return DPFedAvg(PrivacyConfig(**{"noise_multiplier": 1e-9, "clip": 1.0, "seed": 0, **kw}))


def _a_and_b():
    """a holds experts 0, 1: delta [[3, 4], [0, 0]] (norm 5); b holds 1, 2: delta [[0, 0], [0, 0.5]] (norm 0.5).
    Routers and attn.w sent unchanged (delta 0). b reports 100x the examples: it must not matter."""
    a = make_update("a", 1, (0, 1), [[3, 4], [10, 10]], [[0, 0], [0, 0]], [0, 0])
    b = make_update("b", 100, (1, 2), [[10, 10], [20, 20.5]], [[0, 0], [0, 0]], [0, 0])
    return [a, b]


def test_clip_factor_and_the_whole_update_norm():
    assert clip_factor(5.0, 1.0) == pytest.approx(0.2) and clip_factor(0.5, 1.0) == 1.0
    # the norm covers every tensor sent, routers included: a's router delta (0, 1) -> [1, 1] adds to its norm
    a = make_update("a", 1, (0,), [[3, 4]], [[1, 1]], [0, 0])
    _, metrics, _ = dp(clip=5.1).aggregate_fit(1, [a], [], tiny_global())
    assert metrics["dp_clipped"] == 1  # sqrt(25 + 2) > 5.1 though the expert delta alone is 5


def test_clipping_and_unweighted_per_row_means_by_hand():
    out, metrics, state = dp().aggregate_fit(1, _a_and_b(), [], tiny_global())
    np.testing.assert_allclose(
        out["experts.w"],
        [
            [0.6, 0.8],  # a alone, clipped to norm 1: [3, 4] * 1/5
            [10, 10],  # both, zero deltas
            [20, 20.5],  # b alone, unclipped
            [30, 30],  # nobody
        ],
        atol=1e-6,
    )
    np.testing.assert_allclose(out["attn.w"], [0, 0], atol=1e-6)
    assert metrics["dp_clipped"] == 1 and metrics["dp_clip"] == 1.0 and metrics["num_clients"] == 2
    assert state["dp/rounds"].tolist() == [[1e-9, 1.0]]


def test_rows_no_device_held_are_unchanged_and_noiseless():
    g = tiny_global()
    out, _, _ = dp(noise_multiplier=50.0).aggregate_fit(1, _a_and_b(), [], g)
    assert out["experts.w"][3].tolist() == [30, 30] and out["gate.weight"][3].tolist() == [9, 9]
    assert not np.allclose(out["experts.w"][:3], g["experts.w"][:3], atol=1.0)  # held rows are noised


def test_noise_std_is_sigma_times_clip_over_holders():
    """Two devices send the global rows back (zero deltas) for every row: each held coordinate is then
    global + N(0, (z S)^2) / 2. Over 200 rounds x 18 coordinates, sum(x^2) / (z S / 2)^2 is chi-square with 3600
    degrees of freedom; a two-sided test at alpha = 1e-6 fails a correct implementation once in a million runs
    (the seeds are fixed, so it is deterministic here); a std off by 10% (forgetting the holders' division: 100%)
    lands ~9 standard deviations out. The 5% resolution is :func:`test_noisy_rows_std_at_scale`'s."""
    g = tiny_global()
    z, clip = 1.5, 2.0
    same = [make_update(c, 1, (0, 1, 2, 3), g["experts.w"], g["gate.weight"], g["attn.w"]) for c in "ab"]
    strategy = DPFedAvg(PrivacyConfig(noise_multiplier=z, clip=clip, seed=123))
    draws = []
    for server_round in range(1, 201):
        out, metrics, _ = strategy.aggregate_fit(server_round, same, [], g)
        draws += [(out[n].astype(np.float64) - g[n]).ravel() for n in g]
    assert metrics["dp_noise_std"] == z * clip
    x = np.concatenate(draws)
    statistic, dof = float(np.sum(x**2) / (z * clip / 2) ** 2), x.size
    assert dof == 3600
    assert stats.chi2.ppf(0.5e-6, dof) < statistic < stats.chi2.isf(0.5e-6, dof)


def test_noisy_rows_std_at_scale():
    """noisy_rows alone, 200,000 coordinates held by 4 devices: (x - base) * 4 / std is N(0, 1). Chi-square with
    200,000 dof, two-sided alpha = 1e-6 (bounds about +-2.2% of the variance): a std off by 5% (variance +10%)
    fails it by ~20 standard deviations."""
    base, sums = np.full((1000, 200), 3.0), np.zeros((1000, 200))
    out = noisy_rows(base, sums, np.full(1000, 4.0), 0.7, np.random.default_rng(5))
    x = (out - base) * 4 / 0.7
    assert stats.chi2.ppf(0.5e-6, x.size) < float(np.sum(x**2)) < stats.chi2.isf(0.5e-6, x.size)


def test_epsilon_equals_dp_accountings_own():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()  # add-or-remove: the textbook DP-FedAvg number
    for _ in range(5):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)))
    expected = accountant.get_epsilon(1e-5)
    assert epsilon([(1.0, 1.0)] * 5, 1e-5) == pytest.approx(expected, rel=1e-9)
    assert 12.0 < expected < 12.6  # sigma 1, q 1, 5 rounds, delta 1e-5
    assert epsilon([(1.0, 0.1)] * 5, 1e-5) < expected  # amplification by sampling
    # the strategy reports the same after 5 rounds
    strategy, state = DPFedAvg(PrivacyConfig(noise_multiplier=1.0, clip=1.0, seed=0)), None
    for r in range(1, 6):
        _, metrics, state = strategy.aggregate_fit(r, _a_and_b(), [], tiny_global(), state)
    assert metrics["dp_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert strategy.spent(state) == pytest.approx(expected, rel=1e-9)


def test_adaptive_clip_moves_toward_the_target_quantile_by_hand():
    # Andrew et al., Algorithm 1: S <- S exp(-eta (b~ - gamma)), b~ the (noised) share of unclipped updates
    rng = np.random.default_rng(0)
    clip, share = adaptive_clip_step(
        1.0, 3, 4, target_quantile=0.5, learning_rate=0.2, count_stddev=0.0, rng=rng
    )  # 3 of 4 under S: S is above the median, it shrinks
    assert share == 0.75 and clip == pytest.approx(math.exp(-0.2 * 0.25))
    # through the strategy: a (norm 5) clipped, b (norm 0.5) not: b~ ~ 1/2 < gamma 0.8, S grows by exp(0.06)
    p = PrivacyConfig(noise_multiplier=2e-3, target_quantile=0.8, initial_clip=1.0, clipped_count_stddev=1.1e-3, seed=0)
    strategy = DPFedAvg(p)
    _, metrics, state = strategy.aggregate_fit(1, _a_and_b(), [], tiny_global())
    assert metrics["dp_clip"] == 1.0 and metrics["dp_unclipped_share"] == pytest.approx(0.5, abs=0.01)
    assert float(state["dp/clip"][0]) == pytest.approx(math.exp(0.2 * 0.3), rel=1e-2)
    _, metrics, _ = strategy.aggregate_fit(2, _a_and_b(), [], tiny_global(), state)
    assert metrics["dp_clip"] == float(state["dp/clip"][0])  # the next round clips with the carried S


def test_adaptive_noise_split_follows_andrew_et_al_theorem_1():
    z, sb = 1.0, 2.0
    zv = value_noise_multiplier(z, sb)
    assert (zv**-2 + (2 * sb) ** -2) ** -0.5 == pytest.approx(z) and zv > z
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        PrivacyConfig(noise_multiplier=1.0, target_quantile=0.5, clipped_count_stddev=0.4)


def test_the_epsilon_budget_stops_rounds():
    """3 of 10 devices a round (q = 0.3); the budget affords two rounds: the third never starts."""
    strategy = DPFedAvg(PrivacyConfig(noise_multiplier=1.0, clip=1.0, epsilon_budget=epsilon([(1.0, 0.3)] * 2, 1e-5)))
    state = {"now": strategy.initial_state()}
    engine = RoundEngine(
        RoundPolicy(min_fit_clients=2, max_fit_clients=3),
        budget=lambda q: strategy.budget_exceeded(state["now"], q),
    )
    devices = [f"d{i}" for i in range(10)]
    for round_id in (1, 2):
        action = engine.step(0.0, devices)
        assert isinstance(action, StartRound) and engine.sampling_rate == 0.3
        engine.started(round_id, {f"u{round_id}{d}": d for d in action.devices}, 0.0)
        for u in list(engine.current.devices):
            engine.on_update(u, True)
        assert isinstance(engine.step(1.0, devices), Aggregate)
        rounds = np.concatenate([state["now"]["dp/rounds"], [[1.0, engine.sampling_rate]]])
        state["now"] = {"dp/clip": state["now"]["dp/clip"], "dp/rounds": rounds}
        engine.closed()
    action = engine.step(2.0, devices)
    assert isinstance(action, Finished) and action.reason.startswith("privacy budget")
    assert engine.stopped() == action.reason and not engine.selecting


def test_the_privacy_table_round_trips_and_refuses_what_cannot_be_private(tmp_path):
    privacy = {"noise_multiplier": 1.1, "clip": 0.5, "delta": 1e-6, "epsilon_budget": 8.0, "seed": 3}
    cfg = CoordinatorConfig(
        checkpoint=str(tmp_path / "m"), state_dir=str(tmp_path / "s"), strategy="dp-fedavg", privacy=privacy
    )
    assert cfg.privacy == PrivacyConfig(**privacy)
    save_config(cfg, tmp_path / "c.toml")
    assert "[privacy]" in (tmp_path / "c.toml").read_text()
    assert load_config(tmp_path / "c.toml") == cfg
    strategy = make_strategy(cfg)
    assert isinstance(strategy, DPFedAvg) and strategy.privacy == cfg.privacy
    with pytest.raises(ConfigError, match="'hfedmoe' cannot be private: its gate weights"):
        CoordinatorConfig(checkpoint="m", strategy="hfedmoe", privacy=privacy)
    with pytest.raises(ConfigError, match="needs a \\[privacy\\] table"):
        CoordinatorConfig(checkpoint="m", strategy="dp-fedavg")
    with pytest.raises(ConfigError, match="exactly one of clip"):
        CoordinatorConfig(checkpoint="m", strategy="dp-fedavg", privacy={"noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="needs a \\[privacy\\] table"):
        from_name("dp-fedavg")


def test_the_state_round_trips_and_a_foreign_one_is_refused():
    strategy = dp()
    _, _, state = strategy.aggregate_fit(1, _a_and_b(), [], tiny_global())
    assert strategy.check_state(state) is state
    with pytest.raises(ConfigError):
        strategy.check_state({"m/experts.w": np.zeros(2)})


def test_aggregate_round_accounts_the_sampling_rate_logs_epsilon_and_restores_the_state(tmp_path):
    """On a real registry and tensor store: the round's q reaches the accountant, dp_epsilon is a round metric,
    and a restarted coordinator's strategy goes on from the committed clip and round history."""
    from helpers import MOE_EXPERTS, MOE_GATE
    from helpers import stored_update_row as row

    from coordinator.federation import GlobalModel, aggregate_round
    from coordinator.registry import Registry
    from coordinator.tensor_store import TensorStore

    store = TensorStore(tmp_path / "tensors")
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.add_model_version(store.put({n: np.zeros((2, 3), np.float32) for n in (MOE_EXPERTS, MOE_GATE)}))
    strategy = DPFedAvg(PrivacyConfig(noise_multiplier=1.0, target_quantile=0.5, clipped_count_stddev=1.0, seed=1))
    model = GlobalModel(registry, store)
    model.restore(strategy)
    round_id = registry.start_round(strategy.name, {}).id
    rows = [row(store, "a", 1, (0.1, 0.2)), row(store, "b", 5, (3.0, 0.0))]
    version = aggregate_round(model, strategy, rows, [], server_round=1, round_id=round_id, sampling_rate=0.5)
    expected = epsilon([(1.0, 0.5)], 1e-5)
    assert version.metrics["dp_epsilon"] == pytest.approx(expected) and version.metrics["dp_sampling_rate"] == 0.5
    assert [(m.name, m.value) for m in registry.metrics(round_id=round_id)] == [("dp_epsilon", pytest.approx(expected))]
    restarted = GlobalModel(registry, store)
    restarted.restore(strategy)
    assert restarted.strategy_state["dp/rounds"].tolist() == [[1.0, 0.5]]
    assert restarted.strategy_state["dp/clip"].tolist() == [version.metrics["dp_next_clip"]] != [0.1]
    registry.close()


def test_the_accountant_rounds_q_up_never_down():
    assert [accounted_rate(q) for q in (0.3, 1 / 3, 0.0031, 7 / 9, 0.999, 1.0)] == [0.3, 0.34, 0.0031, 0.78, 1.0, 1.0]
    assert epsilon([(1.0, 1 / 3)] * 3, 1e-5) == epsilon([(1.0, 0.34)] * 3, 1e-5) > epsilon([(1.0, 0.33)] * 3, 1e-5)


def test_noise_for_epsilon_spends_at_most_the_target_and_silences_absl(caplog):
    """The calibrated z spends at most the target over the rounds, and 0.1% less noise would spend more; the
    accountant's absl warnings (orders that do not converge at small z and fractional q) stay out of the log."""
    import logging

    from coordinator.privacy import noise_for_epsilon
    from coordinator.simulation.cli import simulation_privacy

    z = noise_for_epsilon(4.0, 5, 1.0, 1e-5)
    assert epsilon([(z, 1.0)] * 5, 1e-5) <= 4.0 < epsilon([(z / 1.002, 1.0)] * 5, 1e-5)
    with caplog.at_level(logging.WARNING):
        assert epsilon([(0.5, 0.2)] * 5, 1e-5) > 10  # dp-accounting excludes orders here
    assert not [r for r in caplog.records if r.name == "absl"]
    with pytest.raises(ConfigError, match="out of reach"):
        noise_for_epsilon(1e-6, 1000, 1.0, 1e-5)
    p = simulation_privacy(4.0, 0.5, True, 5)
    assert (p.noise_multiplier, p.clip, p.epsilon_budget, p.secure_aggregation) == (z, 0.5, 4.0, True)
    assert simulation_privacy(None, 0.1, False, 5) == PrivacyConfig()


def test_secure_aggregation_refuses_strategies_that_need_individual_updates(tmp_path):
    def config(strategy, **privacy):
        return CoordinatorConfig(checkpoint="x", state_dir=str(tmp_path), strategy=strategy, privacy=privacy)

    for name, why in (("fedalign", "cosine similarity"), ("fedprox", "anchor")):
        with pytest.raises(ConfigError, match=f"secure_aggregation cannot run strategy '{name}'.*{why}"):
            config(name, secure_aggregation=True)
    with pytest.raises(ConfigError, match="adaptive clipping"):
        config(
            "dp-fedavg",
            noise_multiplier=1.0,
            target_quantile=0.5,
            clipped_count_stddev=1.0,
            secure_aggregation=True,
        )
    with pytest.raises(ConfigError, match="secure_min_holders"):
        PrivacyConfig(secure_aggregation=True, secure_min_holders=1)
    assert make_strategy(config("fedavg", secure_aggregation=True)).secure_weighting == "examples"
    assert make_strategy(config("hfedmoe", secure_aggregation=True)).secure_weighting == "hfedmoe"
