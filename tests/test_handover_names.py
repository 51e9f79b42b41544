"""handover.py: the names connections travel under, and pairing them back (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeprism.base.net import HostPort
from kubeprism.forward import handover

EP = HostPort("10.0.0.1", 6443)
EP6 = HostPort("2001:db8::1", 6443)
UP = "kp.ab-1.u." + handover.encode_endpoint(EP)


def _valid_fdname(name: str) -> bool:
    """systemd's fdname_is_valid(): printable ASCII, no colon, at most 255 characters."""
    return 0 < len(name) <= handover.FDNAME_MAX and all(
        " " <= c < "\x7f" and c != ":" for c in name
    )


@pytest.mark.parametrize("address", [EP, EP6])
def test_names_round_trip_and_are_valid_fdnames(address: HostPort) -> None:
    names = handover.names_for("0a1b2c3d", 17, address, to_upstream=True, to_client=True)
    assert len(names) == 4 and all(_valid_fdname(n) for n in names)
    sorted_ = handover.sort_passed((i, n) for i, n in enumerate(names))
    assert sorted_.rejected == []
    [conn] = sorted_.connections
    assert (conn.client, conn.upstream, conn.to_upstream, conn.to_client) == (0, 1, 2, 3)
    assert conn.address == address and conn.waiting is None


def test_waiting_client_is_one_descriptor() -> None:
    [name] = handover.names_for("ff", 1, None, to_upstream=False, to_client=False)
    [conn] = handover.sort_passed([(7, name)]).connections
    assert conn.waiting == 7 and conn.client is None


def test_generations_never_pair_across_processes() -> None:
    a = handover.names_for("aaaa", 1, EP, to_upstream=False, to_client=False)
    b = handover.names_for("bbbb", 1, EP, to_upstream=False, to_client=False)
    result = handover.sort_passed([(1, a[0]), (2, b[1])])
    assert result.connections == []
    assert sorted(item for item, _ in result.rejected) == [1, 2]


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["kp.ab-1.c"], "upstream socket is missing"),
        ([UP], "client socket is missing"),
        (["kp.ab-1.c", "kp.ab-1.c", UP], "two descriptors"),
        (["kp.ab-1.w", "kp.ab-1.c"], "waiting client with other"),
        (["kp.ab-1.bu"], "client socket is missing"),
    ],
)
def test_incomplete_connections_are_rejected_whole(names: list[str], why: str) -> None:
    result = handover.sort_passed(list(enumerate(names)))
    assert result.connections == []
    assert sorted(item for item, _ in result.rejected) == list(range(len(names)))
    assert any(why in reason for _, reason in result.rejected), result.rejected


@pytest.mark.parametrize(
    "name",
    [
        "kp.ab-1",
        "kp.AB-1.c",
        "kp.ab-1.x",
        "kp.ab-1.u",
        "kp.ab-1.u.zz",
        "kp.ab-1.u." + b"cp.example.com:6443".hex(),  # not an IP: not an endpoint of ours
        "kp.ab-1.u." + b"10.0.0.1".hex(),  # no port
        "kp.ab-1.u.0a00000119",  # a byte short
        "kp.ab-1.c.extra",
        "xx.ab-1.c",
    ],
)
def test_unparsable_names_are_rejected(name: str) -> None:
    result = handover.sort_passed([(0, name)])
    assert result.connections == [] and [item for item, _ in result.rejected] == [0]


@given(st.text(max_size=80))
def test_any_name_is_sorted_without_raising(name: str) -> None:
    result = handover.sort_passed([(0, name)])
    assert len(result.connections) + len(result.rejected) <= 1


def test_listener_and_foreign_names_are_not_connections() -> None:
    assert not handover.is_connection_name(handover.LISTENER_NAME)
    assert not handover.is_connection_name("kubeprism")  # the socket unit's name
    assert handover.is_connection_name("kp.ab-1.c")


def test_fitting_respects_capacity_and_the_names_budget() -> None:
    lists = [handover.names_for("ab", n, EP, False, False) for n in range(10)]
    assert handover.fitting(lists, 20) == 10
    assert handover.fitting(lists, 7) == 3
    many = [handover.names_for("ab", n, EP6, True, True) for n in range(5000)]
    fit = handover.fitting(many, 1 << 20)
    assert 0 < fit < 5000
    chars = sum(len(n) + 1 for names in many[:fit] for n in names)
    assert chars <= handover.NAMES_BUDGET
