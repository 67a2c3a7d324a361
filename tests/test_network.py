"""The interface the collectives bind to (beitdist.network), and the one line a failed connect ends in."""

from __future__ import annotations

import pytest

from beitdist.distributed import RendezvousError, rendezvous_errors
from beitdist.network import bind_collectives, interface_for, loopback_problem, rendezvous_hint, route_source

ISSUE_ERROR = ("Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144] "
               "no error ... rank=1, size=2, local=[127.0.0.1]:12007, remote=[127.0.0.1]:26009 ... Connection refused")


def test_the_interface_holding_an_address():
    assert interface_for("127.0.0.1") == "lo"
    assert interface_for("203.0.113.7") is None  # TEST-NET-3: on no interface here
    assert interface_for("not an address") is None
    assert route_source("127.0.0.1") == "127.0.0.1"


def test_only_unset_variables_are_set():
    env = {"TP_SOCKET_IFNAME": "ib0"}
    assert bind_collectives("127.0.0.1", env, cuda=False) == {"GLOO_SOCKET_IFNAME": "lo"}
    assert env == {"TP_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "lo"}  # the user's choice is kept
    env = {}
    assert bind_collectives("127.0.0.1", env) == {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo",
                                                  "NCCL_SOCKET_IFNAME": "lo"}
    assert bind_collectives("203.0.113.7", {}) == {} and bind_collectives(None, {}) == {}


def test_a_failed_connect_is_one_line_with_the_addresses_and_the_variable():
    hint = rendezvous_hint(ISSUE_ERROR)
    assert hint is not None and "\n" not in hint
    assert "addresses tried: 127.0.0.1:12007, 127.0.0.1:26009" in hint
    assert "a rank advertised a loopback address" in hint and "GLOO_SOCKET_IFNAME" in hint
    assert rendezvous_hint("CUDA out of memory") is None
    with pytest.raises(RendezvousError, match="could not connect to each other") as caught:
        with rendezvous_errors():
            raise RuntimeError(ISSUE_ERROR)
    assert caught.value.exit_code == 1
    with pytest.raises(ValueError, match="unrelated"), rendezvous_errors():
        raise ValueError("unrelated")


def test_a_run_spanning_nodes_on_loopback_is_refused_before_connecting(monkeypatch):
    assert loopback_problem(2, 2, {"GLOO_SOCKET_IFNAME": "lo"}) is None  # one node: loopback is fine
    problem = loopback_problem(4, 2, {"GLOO_SOCKET_IFNAME": "lo"})
    assert problem is not None and "(2 of 4 ranks here) but GLOO_SOCKET_IFNAME=lo is a loopback interface" in problem
    monkeypatch.setattr("socket.gethostbyname", lambda name: "127.0.1.1")  # Debian's /etc/hosts
    problem = loopback_problem(2, 1, {})
    assert problem is not None and "this host's name resolves to 127.0.1.1" in problem
    monkeypatch.setattr("socket.gethostbyname", lambda name: "10.0.0.5")
    assert loopback_problem(2, 1, {}) is None
