"""Filter-chain selection in Envoy's order (no sockets: ConnectionFacts in, chain out)."""

from __future__ import annotations

import ipaddress

from sidecar.config.l4 import FilterChainMatch
from sidecar.listener.chains import ChainSelector, ConnectionFacts

net = ipaddress.ip_network


def facts(local="10.0.0.1", lport=443, remote="192.168.1.5", rport=40000, sni="",
          transport="raw_buffer", alpn=()) -> ConnectionFacts:
    return ConnectionFacts(local_ip=ipaddress.ip_address(local), local_port=lport,
                           remote_ip=ipaddress.ip_address(remote), remote_port=rport,
                           server_name=sni, transport_protocol=transport,
                           application_protocols=tuple(alpn))


def pick(chains: dict[str, FilterChainMatch], f: ConnectionFacts, default: str | None = None):
    return ChainSelector(list((m, n) for n, m in chains.items()), default).select(f)


def test_a_single_catch_all_chain_gets_everything():
    assert pick({"only": FilterChainMatch()}, facts()) == "only"


def test_destination_port_first_then_no_backtracking():
    chains = {"p443-sni": FilterChainMatch(destination_port=443, server_names=("a.test",)),
              "any": FilterChainMatch()}
    # port 443 has a chain: the port-less one is out, even though the SNI then fails there
    assert pick(chains, facts(lport=443, sni="b.test")) is None
    assert pick(chains, facts(lport=443, sni="b.test"), default="dflt") == "dflt"
    assert pick(chains, facts(lport=443, sni="a.test")) == "p443-sni"
    assert pick(chains, facts(lport=8080, sni="b.test")) == "any"


def test_longest_destination_prefix_wins():
    chains = {"wide": FilterChainMatch(prefix_ranges=(net("10.0.0.0/8"),)),
              "narrow": FilterChainMatch(prefix_ranges=(net("10.0.0.0/24"),)),
              "none": FilterChainMatch()}
    assert pick(chains, facts(local="10.0.0.7")) == "narrow"
    assert pick(chains, facts(local="10.9.0.7")) == "wide"
    assert pick(chains, facts(local="172.16.0.1")) == "none"
    assert pick(chains, facts(local="::1")) == "none"        # families never mix


def test_server_names_exact_then_longest_wildcard_then_none():
    chains = {"exact": FilterChainMatch(server_names=("api.example.com",)),
              "wild": FilterChainMatch(server_names=("*.example.com",)),
              "deeper": FilterChainMatch(server_names=("*.eu.example.com",)),
              "none": FilterChainMatch()}
    assert pick(chains, facts(sni="api.example.com")) == "exact"
    assert pick(chains, facts(sni="web.example.com")) == "wild"
    assert pick(chains, facts(sni="x.eu.example.com")) == "deeper"
    assert pick(chains, facts(sni="a.b.example.com")) == "wild"   # any depth, as Envoy
    assert pick(chains, facts(sni="example.com")) == "none"      # *.x is not x itself
    assert pick(chains, facts(sni="")) == "none"


def test_transport_protocol_defaults_to_raw_buffer():
    chains = {"tls": FilterChainMatch(transport_protocol="tls"),
              "raw": FilterChainMatch(transport_protocol="raw_buffer")}
    assert pick(chains, facts()) == "raw"
    assert pick(chains, facts(transport="tls")) == "tls"


def test_transport_before_application_protocols():
    chains = {"http": FilterChainMatch(application_protocols=("http/1.1",)),
              "raw": FilterChainMatch(transport_protocol="raw_buffer")}
    # the chain naming the transport wins: ALPN is only looked at among those
    assert pick(chains, facts(alpn=("http/1.1",))) == "raw"


def test_application_protocols_any_of_the_offered():
    chains = {"h2": FilterChainMatch(application_protocols=("h2",)),
              "h1": FilterChainMatch(application_protocols=("http/1.1", "http/1.0")),
              "none": FilterChainMatch()}
    assert pick(chains, facts(alpn=("h2", "http/1.1"))) == "h2"
    assert pick(chains, facts(alpn=("http/1.0",))) == "h1"
    assert pick(chains, facts(alpn=("imap",))) == "none"


def test_source_criteria_come_last_in_order():
    chains = {"direct": FilterChainMatch(direct_source_prefix_ranges=(net("192.168.0.0/16"),)),
              "local": FilterChainMatch(source_type="SAME_IP_OR_LOOPBACK"),
              "src": FilterChainMatch(source_prefix_ranges=(net("192.168.1.0/24"),)),
              "port": FilterChainMatch(source_ports=(40000,))}
    assert pick(chains, facts(remote="192.168.1.5")) == "direct"
    assert pick(chains, facts(remote="127.0.0.1")) == "local"
    ext = {"ext": FilterChainMatch(source_type="EXTERNAL"), "none": FilterChainMatch()}
    assert pick(ext, facts(remote="127.0.0.1")) == "none"
    assert pick(ext, facts(remote="8.8.8.8")) == "ext"
    src = {"src": FilterChainMatch(source_prefix_ranges=(net("192.168.1.0/24"),)),
           "port": FilterChainMatch(source_ports=(40000,))}
    assert pick(src, facts(remote="192.168.1.5")) == "src"
    assert pick(src, facts(remote="192.168.2.5")) == "port"
    assert pick(src, facts(remote="192.168.2.5", rport=1)) is None


def test_same_ip_counts_as_local():
    chains = {"local": FilterChainMatch(source_type="SAME_IP_OR_LOOPBACK")}
    assert pick(chains, facts(local="10.0.0.1", remote="10.0.0.1")) == "local"
    assert pick(chains, facts(local="10.0.0.1", remote="10.0.0.2")) is None
