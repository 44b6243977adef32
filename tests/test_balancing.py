"""Each balancing policy spreads requests the way it promises."""

import collections
import threading
import time

import requests

from rproxy.upstreams.balancing import ConsistentHash, LeastConn, RandomTwo


class FakeServer:
    def __init__(self, label, weight=1):
        self.label, self.weight, self.in_flight, self.current_weight = label, weight, 0, 0


def servers(*weights):
    return [FakeServer(f"10.0.0.{i}:80", w) for i, w in enumerate(weights, 1)]


def test_consistent_hash_spreads_keys_and_moves_only_the_removed_servers_share():
    group = servers(1, 1, 1, 1)
    ring = ConsistentHash(group)
    keys = [f"client-{i}" for i in range(4000)]
    before = {k: ring.pick(group, k) for k in keys}
    counts = collections.Counter(s.label for s in before.values())
    assert all(700 < n < 1300 for n in counts.values()), counts
    gone = group[1]
    after = {k: ring.pick([s for s in group if s is not gone], k) for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is gone for k in moved)
    assert len(moved) == counts[gone.label]


def test_consistent_hash_honours_weights():
    group = servers(1, 3)
    ring = ConsistentHash(group)
    counts = collections.Counter(ring.pick(group, f"k{i}").label for i in range(8000))
    share = counts[group[1].label] / 8000
    assert 0.68 < share < 0.82, share


def test_least_conn_prefers_fewer_in_flight_relative_to_weight():
    a, b, c = servers(1, 1, 2)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 3
    policy = LeastConn([a, b, c])
    assert policy.pick([a, b, c]) is b       # 1/1 beats 3/2 and 3/1
    b.in_flight = 2
    assert policy.pick([a, b, c]) is c       # 3/2 beats 2/1
    # Ties rotate rather than always landing on the first.
    a.in_flight = b.in_flight = c.in_flight = 0
    assert len({policy.pick([a, b, c]).label for _ in range(6)}) > 1


def test_random_two_choices_follows_weights_and_load():
    group = servers(1, 1, 1)
    policy = RandomTwo(group)
    counts = collections.Counter(policy.pick(group).label for _ in range(6000))
    assert all(1500 < n < 2500 for n in counts.values()), counts
    group[0].in_flight = 10
    counts = collections.Counter(policy.pick(group).label for _ in range(3000))
    # The loaded server only wins when it is drawn twice: about 1/9 of the time.
    assert counts[group[0].label] < 600, counts


def ports_of(proxy, n, **kw):
    return [requests.get(proxy.url + "/echo", timeout=10, **kw).json()["port"] for _ in range(n)]


def balanced(start_proxy, start_upstream, policy: str):
    """Two real upstream servers behind one upstream with `policy` lines."""
    a, b = start_upstream(), start_upstream()
    proxy = start_proxy(f"[upstream:app]\nservers = 127.0.0.1:{a.port} 127.0.0.1:{b.port}\n{policy}\n"
                        f"[route:default]\nupstream = app\n")
    return proxy, a, b


def test_least_conn_sends_work_away_from_a_busy_server(start_proxy, start_upstream):
    proxy, a, b = balanced(start_proxy, start_upstream, "balance = least_conn")
    # A slow request holds one server; everything else goes to the other.
    slow = threading.Thread(target=requests.get, args=(proxy.url + "/slow?delay=2",), kwargs={"timeout": 10})
    slow.start()
    time.sleep(0.3)
    ports = ports_of(proxy, 10)
    slow.join()
    assert len(set(ports)) == 1


def test_hash_on_a_header_is_sticky(start_proxy, start_upstream):
    proxy, a, b = balanced(start_proxy, start_upstream, "balance = hash\nhash_key = header:X-User")
    for user in ("alice", "bob", "carol", "dave"):
        assert len(set(ports_of(proxy, 5, headers={"X-User": user}))) == 1
    spread = {ports_of(proxy, 1, headers={"X-User": f"user-{i}"})[0] for i in range(20)}
    assert spread == {str(a.port), str(b.port)}


def test_ip_hash_keeps_a_client_on_one_server(start_proxy, start_upstream):
    proxy, a, b = balanced(start_proxy, start_upstream, "balance = ip_hash")
    # The real client address comes from X-Forwarded-For: the test client is a trusted proxy.
    for ip in ("203.0.113.1", "203.0.113.2", "198.51.100.7"):
        assert len(set(ports_of(proxy, 4, headers={"X-Forwarded-For": ip}))) == 1
    spread = {ports_of(proxy, 1, headers={"X-Forwarded-For": f"203.0.113.{i}"})[0] for i in range(1, 30)}
    assert len(spread) == 2


def test_random_uses_every_server(start_proxy, start_upstream):
    proxy, a, b = balanced(start_proxy, start_upstream, "balance = random")
    counts = collections.Counter(ports_of(proxy, 60))
    assert set(counts) == {str(a.port), str(b.port)} and min(counts.values()) > 10
