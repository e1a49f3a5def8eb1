"""Secure aggregation of sparse rows (``device_runtime.secagg``, ``coordinator.secagg``), the protocol run in
process between real ``DeviceSecAgg`` states and a ``SecureRound`` (real X25519, AES, Shamir; no sockets: the
websocket round is in ``test_secagg_server.py``). Checked: what the coordinator stores is uniformly masked, the
unmasked sums equal plain FedAvg / DP-FedAvg, a device dropping between masking and unmasking is recovered, too
few survivors fail with a clear error, and thin rows are never exposed."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import numpy as np
import pytest
from helpers import make_update, tiny_global
from scipy import stats

from coordinator.privacy import PrivacyConfig
from coordinator.secagg import SecureMember, SecureRound, SecureSettings, secure_sums
from coordinator.strategy import DPFedAvg, FedAvg
from device_runtime.errors import ProtocolError
from device_runtime.secagg import (
    WORD,
    DeviceSecAgg,
    Slot,
    combine_secret,
    row_weighting,
    split_secret,
    unmaskable,
)
from device_runtime.wire import (
    PROTOCOL_VERSION,
    FitConfig,
    Participant,
    SecAggKeys,
    SecAggRoster,
    SecAggUnmask,
    decode,
    encode,
)

ROUND = 7
SETTINGS = SecureSettings("examples", 10.0, 0.0, 64.0, 2, 0.5, 60.0)


def slots(ids):
    """The slots of a device of ``tiny_global`` training experts ``ids`` (router rows: the same)."""
    rows = [Slot("attn.w", 0, 0, "shared", -1, 2)]
    rows += [Slot("experts.w", i, g, "trained", 0, 2) for i, g in enumerate(ids)]
    rows += [Slot("gate.weight", i, g, "held", 0, 2) for i, g in enumerate(ids)]
    return tuple(sorted(rows, key=lambda s: s.name))


def wire(msg):
    """Through the real framing (every field checked by the decoder)."""
    return decode(encode(msg), max_size=1 << 24)


class Federation:
    """Devices ``holdings`` (device id -> (num_examples, expert ids)) through one secure round up to the masked
    payloads; ``updates`` are their plain ClientUpdates (deltas of +k on every row, k their index + 1)."""

    def __init__(self, holdings, settings=SETTINGS, seed=0):
        rng = np.random.default_rng(seed)
        g = tiny_global()
        self.global_params = g
        members = [
            SecureMember(d, f"u-{d}", (tuple(ids),), (tuple(ids),), slots(ids)) for d, (_, ids) in holdings.items()
        ]
        self.round = SecureRound(ROUND, members, settings, now=0.0)
        self.devices = {d: DeviceSecAgg(wire(self.round.start_message(d)), d) for d in holdings}
        self.updates, self.payloads = {}, {}
        for d, device in self.devices.items():
            self.round.on_keys(d, wire(device.keys()))
        for d, msg in self.round.advance(0.0).sends:
            self.round.on_shares(d, wire(self.devices[d].on_roster(wire(msg))))
        for d, msg in self.round.advance(0.0).sends:
            self.devices[d].on_inbox(wire(msg))
        for d, (n, ids) in holdings.items():
            ids = list(ids)
            experts = g["experts.w"][ids] + rng.normal(0, 0.3, (len(ids), 2))
            gate = g["gate.weight"][ids] + rng.normal(0, 0.3, (len(ids), 2))
            other = g["attn.w"] + rng.normal(0, 0.3, 2)
            update = make_update(d, n, ids, experts, gate, other)
            self.updates[d] = update
            base = {"experts.w": g["experts.w"][ids], "gate.weight": g["gate.weight"][ids], "attn.w": g["attn.w"]}
            self.payloads[d] = self.devices[d].mask(
                slots(ids), base, update.tensors, row_weighting(self.devices[d].start, n, {}, (), ())
            )

    def unmask(self, u3):
        """Unmask the payloads of ``u3``: each of them reveals what it is asked."""
        for d, msg in self.round.unmask(u3):
            self.round.on_reveal(d, wire(self.devices[d].on_unmask(wire(msg))))
        seeds, masks = self.round.secrets()
        return secure_sums(self.round, self.payloads.__getitem__, self.global_params, seeds, masks)


HOLDINGS = {"a": (4, (0, 1)), "b": (6, (1, 2)), "c": (2, (0, 1, 2)), "d": (8, (1,))}


def test_stored_payloads_are_uniformly_masked_and_only_the_sums_match_fedavg():
    fed = Federation(HOLDINGS)
    words = np.concatenate([np.frombuffer(p, WORD) for p in fed.payloads.values()])
    # each 32-bit word of a masked row is uniform: its 4 bytes over 256 bins (chi-square, alpha 1e-6: a uniform
    # stream fails it once in a million runs), and far from the small fixed-point numbers the plain values are
    counts = np.bincount(np.frombuffer(words.tobytes(), np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    signed = words.view("<i4").astype(np.float64) / 2**31
    assert np.mean(np.abs(signed)) > 0.3  # uniform on (-1, 1): mean 0.5; plain quantised rows are ~1e-2
    sums = fed.unmask(list(HOLDINGS))
    params, metrics, _ = FedAvg().aggregate_secure(1, sums, [], fed.global_params)
    expected, _, _ = FedAvg().aggregate_fit(1, list(fed.updates.values()), [], fed.global_params)
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], atol=1e-6)
    assert metrics["num_clients"] == 4 and metrics["secagg_rows_below_min"] == 0


def test_one_device_dropping_between_masking_and_unmasking_is_recovered():
    """d drops after sending its shares (its masked rows never arrive): the sum over a, b, c equals FedAvg over
    them; d's pairwise masks with them are removed with its key, reconstructed from 3 (= t) shares."""
    fed = Federation(HOLDINGS)
    sums = fed.unmask(["a", "b", "c"])
    params, metrics, _ = FedAvg().aggregate_secure(1, sums, [], fed.global_params)
    expected, _, _ = FedAvg().aggregate_fit(1, [fed.updates[d] for d in "abc"], [], fed.global_params)
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], atol=1e-6)
    assert metrics["secagg_dropped"] == 1


def test_a_row_left_with_one_holder_is_never_unmasked():
    """c drops: row 2 (held by b and c) would be b's alone, so b is not unmasked; then row 0 (a and c) is a's
    alone, so a is not either: nothing can be unmasked and the round fails."""
    holdings = {"a": (4, (0, 1)), "b": (6, (1, 2)), "c": (2, (0, 1, 2))}
    fed = Federation(holdings)
    assert unmaskable(fed.round.roster, fed.round.u2, ["a", "b"], 2) == set()
    with pytest.raises(ProtocolError, match="cannot be unmasked|can be unmasked"):
        fed.round.unmask(["a", "b"])


def test_below_the_threshold_the_round_fails_clearly():
    fed = Federation(HOLDINGS)  # t = 3 of 4
    assert fed.round.threshold == 3
    fed.round.unmask(["a", "b", "c"])
    for d in "ab":
        fed.round.on_reveal(d, fed.devices[d].on_unmask(fed.round.asked[d]))
    with pytest.raises(ProtocolError, match="2 devices revealed their shares, the threshold is t = 3"):
        fed.round.secrets()


def test_devices_refuse_to_reveal_both_secrets_or_a_thin_row():
    fed = Federation(HOLDINGS)
    (d, request), *_ = fed.round.unmask(list(HOLDINGS))
    fed.devices[d].on_unmask(request)

    flipped = dataclasses.replace(request, survivors=("a", "b", "c"), dropped=("d",))  # d: its seed, then its key
    with pytest.raises(ProtocolError, match="both secrets"):
        fed.devices[d].on_unmask(flipped)
    fresh = Federation(HOLDINGS)
    (d, request), *_ = fresh.round.unmask(list(HOLDINGS))
    thin = dataclasses.replace(request, survivors=("a", "b", "d"), dropped=("c",))  # row 0: a alone
    with pytest.raises(ProtocolError, match="expose a row"):
        fresh.devices[d].on_unmask(thin)


def test_dp_fedavg_over_secure_sums_clips_on_the_device_and_noises_the_sums():
    """With z ~ 0 the result is the unweighted mean of the clipped deltas, which DP-FedAvg computes in clear."""
    p = PrivacyConfig(noise_multiplier=1e-9, clip=0.5, seed=0, secure_aggregation=True)
    settings = SecureSettings.from_config(p, FitConfig(), "unit")
    assert (settings.clip, settings.clip_range, settings.weighting) == (0.5, 0.5, "unit")
    fed = Federation(HOLDINGS, settings)
    params, metrics, state = DPFedAvg(p).aggregate_secure(1, fed.unmask(list(HOLDINGS)), [], fed.global_params)
    expected, plain, _ = DPFedAvg(p).aggregate_fit(1, list(fed.updates.values()), [], fed.global_params)
    for name in expected:
        np.testing.assert_allclose(params[name], expected[name], atol=1e-6)
    assert metrics["dp_epsilon"] == plain["dp_epsilon"] and state["dp/rounds"].tolist() == [[1e-9, 1.0]]


def test_shamir_shares_of_a_32_byte_secret():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert len(shares) == 5 and all(len(s) == 32 for s in shares)
    assert combine_secret({2: shares[1], 4: shares[3], 5: shares[4]}, 3) == secret
    with pytest.raises(ProtocolError, match="2 shares, 3 needed"):
        combine_secret({1: shares[0], 2: shares[1]}, 3)


def test_messages_are_bounded_and_checked():
    def frame(header):
        raw = json.dumps({"v": PROTOCOL_VERSION, **header}).encode()
        return struct.pack(">I", len(raw)) + raw

    key = base64.b64encode(b"k" * 32).decode()
    keys = {"type": "secagg_keys", "round_id": 1, "update_id": "u", "cipher_key": key, "mask_key": key}
    assert isinstance(decode(frame(keys), max_size=1 << 20), SecAggKeys)
    for bad in ({"mask_key": base64.b64encode(b"k" * 31).decode()}, {"round_id": -1}, {"extra": 1}):
        with pytest.raises(ProtocolError, match="bad_header|secagg_keys"):
            decode(frame({**keys, **bad}), max_size=1 << 20)
    p = Participant("a", b"x" * 32, b"y" * 32, ((0,),), ((0,),))
    with pytest.raises(ProtocolError, match="names a device twice"):
        SecAggRoster(round_id=1, update_id="u", threshold=2, participants=(p, p))
    fed = Federation(HOLDINGS)
    roster = fed.round.sent["a"][1]

    with pytest.raises(ProtocolError, match="sorted ids"):
        dataclasses.replace(roster, participants=roster.participants[::-1])
    requests = dict(fed.round.unmask(list(HOLDINGS)))
    reveal = fed.devices["a"].on_unmask(requests["a"])
    with pytest.raises(ProtocolError, match="not those asked"):
        fed.round.on_reveal("a", dataclasses.replace(reveal, shares=reveal.shares[1:]))
    with pytest.raises(ProtocolError, match="no secure assignment"):
        fed.round.on_reveal("b", reveal)
    fed.round.on_reveal("a", reveal)


def test_a_device_forgets_older_secure_rounds_when_a_new_one_starts():
    """The client's bookkeeping (``SecureRounds``): a repeated start gets the same keys, a different one for the
    same assignment is refused, and a new assignment's start drops the older round's state and result."""
    from device_runtime.secure_rounds import SecureRounds

    rounds = SecureRounds("a")
    first = dataclasses.replace(Federation(HOLDINGS).round.start_message("a"), update_id="u1")
    keys = rounds.answer(first)
    rounds.arrived(first)
    assert rounds.answer(first) == keys and rounds.expects("u1")
    with pytest.raises(ProtocolError, match="different secure start"):
        rounds.answer(dataclasses.replace(first, min_holders=3))
    rounds.unacked["u1"] = "a masked result"
    second = dataclasses.replace(first, round_id=first.round_id + 1, update_id="u2")
    rounds.answer(second)
    rounds.arrived(second)
    assert rounds.expects("u2") and not rounds.expects("u1") and not rounds.unacked
    with pytest.raises(ProtocolError, match="no secure round of this device"):
        rounds.answer(SecAggUnmask(round_id=first.round_id, update_id="u1", survivors=("a", "b"), dropped=()))
