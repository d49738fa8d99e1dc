from __future__ import annotations

import socket

import pytest

from cpet import hub

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                   "no_proxy")


@pytest.fixture
def no_proxies(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "hub_offline_by_choice", lambda: False)
    monkeypatch.setattr(hub, "hub_endpoint", lambda: "https://hub.example.invalid")
    return monkeypatch


def _listening_socket():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


def test_without_a_proxy_the_hub_host_itself_is_probed(no_proxies):
    assert not hub.hub_reachable(timeout=1.0)  # .invalid never resolves
    assert hub.unreachable_reason() == "hub.example.invalid cannot be reached from this machine"


def test_behind_a_proxy_the_proxy_is_probed_not_the_hub(no_proxies):
    """Behind a proxy the hub's host is often not reachable directly: the direct probe called a working hub out
    of reach, and a hub id was then read only from the local cache."""
    server = _listening_socket()
    try:
        port = server.getsockname()[1]
        no_proxies.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        assert hub.hub_reachable(timeout=1.0)
        no_proxies.setenv("NO_PROXY", "hub.example.invalid")  # exempted: the hub is asked directly again
        assert not hub.hub_reachable(timeout=1.0)
    finally:
        server.close()
    no_proxies.delenv("NO_PROXY")
    assert not hub.hub_reachable(timeout=1.0)  # the proxy is gone
    assert hub.unreachable_reason() == f"the proxy 127.0.0.1:{port} set in the environment cannot be reached from " \
        "this machine"


@pytest.mark.parametrize("variable, value, where", [
    ("ALL_PROXY", "http://proxy.example:3128", "proxy.example:3128"),    # httpx (huggingface_hub) reads all://
    ("https_proxy", "https://proxy.example", "proxy.example:443"),       # the port that is probed, not 80
    ("HTTPS_PROXY", "proxy.example:8080", "proxy.example:8080"),        # no scheme: http
])
def test_the_proxy_probed_is_the_one_the_libraries_use(no_proxies, variable, value, where):
    no_proxies.setenv(variable, value)
    assert hub.unreachable_reason() == f"the proxy {where} set in the environment cannot be reached from this machine"


def test_a_proxy_with_a_malformed_port_is_out_of_reach_not_a_crash(no_proxies):
    no_proxies.setenv("HTTPS_PROXY", "http://proxy.example:abc")
    assert not hub.hub_reachable(timeout=1.0)
    assert "its port is not a number" in hub.unreachable_reason()
