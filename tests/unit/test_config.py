"""Each validation error: the right line, the field, and what to do."""

import json
from pathlib import Path

import pytest

from egress_agent.config import ConfigError, load, parse, schema

HEAD = "version: 1\nhost: {name: h, region: ams}\n"
DESIGN = Path(__file__).parent.parent / "configs" / "design.yaml"


def problems(text):
    with pytest.raises(ConfigError) as e:
        parse(text, "f.yaml")
    return e.value.problems


def one(text):
    ps = problems(text)
    assert len(ps) == 1, [str(p) for p in ps]
    return ps[0]


def test_design_example_is_valid():
    cfg = parse(DESIGN.read_text(), str(DESIGN)).config
    assert [ip.id for ip in cfg.egress_ips] == ["ams-1", "m-42-ip"]
    assert cfg.policies[0].egress.ipv4_fallback == "drop"


@pytest.mark.parametrize("body, line, path, words", [
    ("egress_ips:\n  - {id: a, app: x, ipv4: 2001:db8::1}\n", 4, "egress_ips[0].ipv4", "IPv6 address"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.256}\n", 4, "egress_ips[0].ipv4", "not an IPv4"),
    ("egress_ips:\n  - {id: a, app: x, ipv6: 203.0.113.0/24}\n", 4, "egress_ips[0].ipv6", "IPv4"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1, ipv6: 2001:db8::/126}\n", 4,
     "egress_ips[0].ipv6", "too small"),
    ("egress_ips:\n  - {id: a, ipv4: 203.0.113.1}\n", 4, "egress_ips[0]", "exactly one of app"),
    ("egress_ips:\n  - {id: a, app: x}\n", 4, "egress_ips[0]", "ipv4, ipv6 or both"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1, state: gone}\n", 4,
     "egress_ips[0].state", "active"),
    ("workloads:\n  - {id: w, source: [10.0.0.0/24]}\n", 4, "workloads[0].source[0]", "is a network"),
    ("workloads:\n  - {id: w, source: [10.0.0.1/8]}\n", 4, "workloads[0].source[0]", "host bits"),
    ("workloads:\n  - {id: w, cgroup: 'a b/c'}\n", 4, "workloads[0].cgroup", "nftables can take"),
    ("workloads:\n  - {id: w, cgroup: 'a/\"x'}\n", 4, "workloads[0].cgroup", "nftables can take"),
    ("workloads:\n  - {id: w, cgroup: a/../b}\n", 4, "workloads[0].cgroup", "nftables can take"),
    ("workloads:\n  - {id: w, source: [10.0.0.1], interface: this-name-is-too-long}\n", 4,
     "workloads[0].interface", "interface name"),
    ("workloads:\n  - {id: w}\n", 4, "workloads[0]", "either source"),
    ("workloads:\n  - {id: w, cgroup: a, interface: eth0}\n", 4, "workloads[0]", "interface only"),
    ("workloads:\n  - {id: w, source: [10.0.0.1], colour: red}\n", 4, "workloads[0].colour", "unknown field"),
    ("defaults: {ports_per_workload: 0}\n", 3, "defaults.ports_per_workload", "greater than"),
    ("defaults: {port_range: 70000}\n", 3, "defaults.port_range", "1 to 65535"),
    ("defaults: {unavailable: maybe}\n", 3, "defaults.unavailable", "default"),
    ("policies:\n  - name: p\n    egress: {}\n", 5, "policies[0].egress", "name an egress IP"),
    ("policies:\n  - name: p\n    match: {protocols: [sctp]}\n    egress: drop\n", 5,
     "policies[0].match.protocols[0]", "tcp"),
    ("exclude: {destinations: [10.0.0.0/33]}\n", 3, "exclude.destinations[0]", "not an address"),
    ("host: {name: x, region: y}\n", 3, "host", "twice"),
    ("defaults: {unavailable: {}}\n", 3, "defaults.unavailable", "{} is not allowed"),
])
def test_field_errors(body, line, path, words):
    p = one(HEAD + body)
    assert (p.line, p.path) == (line, path), str(p)
    assert words in p.message, str(p)
    assert str(p).startswith(f"f.yaml:{line}: {path}: ")


@pytest.mark.parametrize("body, line, path, words", [
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\n  - {id: a, app: x, ipv4: 203.0.113.2}\n",
     5, "egress_ips[1].id", "already used"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\n  - {id: b, app: x, ipv4: 203.0.113.1}\n",
     5, "egress_ips[1].ipv4", "already used"),
    ("egress_ips:\n  - {id: a, app: x, ipv6: '2001:db8::/64'}\n  - {id: b, app: x, ipv6: '2001:db8::/48'}\n",
     5, "egress_ips[1].ipv6", "overlaps"),
    ("workloads:\n  - {id: a, source: [10.0.0.1]}\n  - {id: b, source: [10.0.0.2, 10.0.0.1]}\n",
     5, "workloads[1].source[1]", "already used"),
    ("workloads:\n  - {id: a, cgroup: x/y}\n  - {id: b, cgroup: x/y}\n", 5, "workloads[1].cgroup",
     "already used"),
    ("egress_ips:\n  - {id: a, workload: ghost, ipv4: 203.0.113.1}\n", 4, "egress_ips[0].workload",
     "unknown workload"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1, ports: 1000-1500}\n", 4,
     "egress_ips[0].ports", "does not fit"),
    ("defaults: {port_range: 1024-2000}\n", 3, "defaults.ports_per_workload", "does not fit"),
    ("policies:\n  - name: p\n    egress: {ipv4: nope}\n", 5, "policies[0].egress.ipv4", "unknown egress IP"),
    ("egress_ips:\n  - {id: a, app: x, ipv6: '2001:db8::/64'}\npolicies:\n  - name: p\n"
     "    egress: {ipv4: a}\n", 7, "policies[0].egress.ipv4", "has no ipv4"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\npolicies:\n  - name: p\n"
     "    egress: {ipv4: a, ipv4_fallback: a}\n", 7, "policies[0].egress.ipv4_fallback", "differ"),
    ("egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\npolicies:\n  - name: p\n"
     "    egress: {ipv4: a, ipv4_fallback: somewhere}\n", 7, "policies[0].egress.ipv4_fallback",
     "neither default, drop"),
    ("policies:\n  - name: p\n    match: {apps: [ghost]}\n    egress: drop\n", 5,
     "policies[0].match.apps[0]", "unknown app"),
    ("policies:\n  - {name: p, egress: drop}\n  - {name: p, egress: default}\n", 5, "policies[1].name",
     "already used"),
])
def test_semantic_errors(body, line, path, words):
    p = one(HEAD + body)
    assert (p.line, p.path) == (line, path), str(p)
    assert words in p.message, str(p)


IP_BILLING = "egress_ips:\n  - {id: b1, app: billing, ipv4: 203.0.113.1, ipv6: '2001:db8:1::/64'}\n"


@pytest.mark.parametrize("body, line, path, message", [
    (IP_BILLING + "workloads:\n  - {id: w, app: biling, source: [10.0.0.1]}\n", 6, "workloads[0].app",
     "no egress IP serves app 'biling' in region 'ams'; did you mean 'billing'?"),
    (IP_BILLING + "workloads:\n  - {id: w, app: zzz, source: [10.0.0.1]}\n", 6, "workloads[0].app",
     "no egress IP serves app 'zzz' in region 'ams'; add an egress IP with this app, or fix the name"),
    (IP_BILLING + "  - {id: o, app: web, region: fra, ipv4: 203.0.113.9}\n"
     "workloads:\n  - {id: w, app: web, source: [10.0.0.1]}\n", 7, "workloads[0].app",
     "no egress IP serves app 'web' in region 'ams' (it has egress IPs in fra); add an egress IP "
     "with this app, or fix the name"),
    (IP_BILLING + "workloads:\n  - {id: w, app: billing, source: [203.0.113.1]}\n", 4, "egress_ips[0].ipv4",
     "203.0.113.1 is also the source of workload 'w' (workloads[0].source[0]); an egress address "
     "must not be a workload's address"),
    (IP_BILLING + "workloads:\n  - {id: w, app: billing, source: ['2001:db8:1::7']}\n", 4,
     "egress_ips[0].ipv6", "range 2001:db8:1::/64 holds 2001:db8:1::7, the source of workload 'w' "
     "(workloads[0].source[0]); use a range of its own"),
    (IP_BILLING + "managed_sources: [203.0.113.0/24]\n", 4, "egress_ips[0].ipv4",
     "203.0.113.1 lies inside managed_sources[0] (203.0.113.0/24); egress addresses must be "
     "outside the workloads' networks"),
    (IP_BILLING + "managed_sources: ['2001:db8::/32']\n", 4, "egress_ips[0].ipv6",
     "range 2001:db8:1::/64 overlaps managed_sources[0] (2001:db8::/32); egress addresses must be "
     "outside the workloads' networks"),
])
def test_mistakes_are_errors(body, line, path, message):
    p = one(HEAD + body)
    assert str(p) == f"f.yaml:{line}: {path}: {message}"


def test_an_app_served_only_by_a_machine_scoped_ip_is_fine():
    cfg = parse(HEAD + "egress_ips:\n  - {id: m, workload: w, ipv4: 203.0.113.1}\n"
                "workloads:\n  - {id: w, app: solo, source: [10.0.0.1]}\n", "f.yaml").config
    assert cfg.workloads[0].app == "solo"


def test_every_problem_is_reported_at_once():
    ps = problems(HEAD + "egress_ips:\n  - {id: a, app: x, ipv4: bad}\n  - {id: b, app: x, ipv4: worse}\n")
    assert [p.line for p in ps] == [4, 5]


def test_yaml_syntax_error_has_a_line():
    p = one("version: 1\nhost: {name: h\nworkloads: [\n")
    assert p.line >= 2 and "YAML syntax" in p.message


def test_a_mapping_where_a_literal_belongs_is_reported():  # found by the fuzzer
    p = one("version: {}\nhost: {name: h, region: ams}\n")
    assert str(p) == "f.yaml:1: version: {} is not allowed: input should be 1"


def test_missing_required_field():
    p = one("version: 1\n")
    assert p.message == "missing required field 'host'" and p.line == 1


def test_schema_is_json_schema_and_knows_every_section():
    s = schema()
    json.dumps(s)
    assert set(s["properties"]) >= {"version", "host", "egress_ips", "workloads", "exclude",
                                    "policies", "defaults", "managed_sources"}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_include_appends_fragments_in_name_order(tmp_path):
    main = write(tmp_path / "config.yaml", HEAD + "include: [conf.d/*.yaml]\n"
                 "egress_ips:\n  - {id: a, app: x, ipv4: 203.0.113.1}\n")
    write(tmp_path / "conf.d/20-web.yaml", "workloads:\n  - {id: web1, app: x, source: [10.0.0.2]}\n")
    write(tmp_path / "conf.d/10-api.yaml", "workloads:\n  - {id: api1, app: x, source: [10.0.0.1]}\n"
          "policies:\n  - {name: p1, egress: drop}\n")
    from egress_agent.config import load
    loaded = load(main)
    assert [w.id for w in loaded.config.workloads] == ["api1", "web1"]
    assert [p.name for p in loaded.config.policies] == ["p1"]
    assert loaded.files == (str(main), str(tmp_path / "conf.d/10-api.yaml"),
                            str(tmp_path / "conf.d/20-web.yaml"))


def test_errors_in_an_included_file_name_that_file_and_line(tmp_path):
    main = write(tmp_path / "config.yaml", HEAD + "include: [conf.d/*.yaml]\n"
                 "workloads:\n  - {id: api1, source: [10.0.0.1]}\n")
    frag = write(tmp_path / "conf.d/web.yaml", "# web team\nworkloads:\n"
                 "  - {id: web1, source: [10.0.0.2]}\n  - {id: api1, source: [10.0.0.3]}\n"
                 "  - {id: web3, source: [10.0.0.300]}\n")
    from egress_agent.config import load
    with pytest.raises(ConfigError) as e:
        load(main)
    # both at once, in line order: the field error, and the duplicate found among the rest
    assert [(p.file, p.line, p.path) for p in e.value.problems] == [
        (str(frag), 4, "workloads[2].id"), (str(frag), 5, "workloads[3].source[0]")]
    frag.write_text("workloads:\n  - {id: web1, source: [10.0.0.2]}\n  - {id: api1, source: [10.0.0.3]}\n")
    with pytest.raises(ConfigError) as e:
        load(main)
    (p,) = e.value.problems
    assert (p.file, p.line, p.path) == (str(frag), 3, "workloads[2].id") and "already used" in p.message


def test_included_file_may_not_change_host_settings(tmp_path):
    main = write(tmp_path / "config.yaml", HEAD + "include: ['*.d.yaml']\n")
    frag = write(tmp_path / "evil.d.yaml", "workloads: []\nhost: {name: x, region: y}\n")
    from egress_agent.config import load
    with pytest.raises(ConfigError) as e:
        load(main)
    (p,) = e.value.problems
    assert (p.file, p.line, p.path) == (str(frag), 2, "host") and "may only hold" in p.message


MERGED = HEAD + """egress_ips:
  - &ip {id: a, app: a, ipv4: 203.0.113.1}
  - {<<: *ip, id: b, ipv4: 203.0.113.2}
workloads:
  - &vm {app: a, interface: eth0, id: m1, source: [10.0.0.1]}
  - {<<: *vm, id: m2, source: [SOURCE]}
"""


def test_merge_keys_are_read_and_written_keys_override_them():
    cfg = parse(MERGED.replace("SOURCE", "10.0.0.2"), "f.yaml").config
    assert [(ip.id, ip.app, ip.ipv4) for ip in cfg.egress_ips] == [
        ("a", "a", "203.0.113.1"), ("b", "a", "203.0.113.2")]
    assert [(w.id, w.interface, w.source) for w in cfg.workloads] == [
        ("m1", "eth0", ["10.0.0.1"]), ("m2", "eth0", ["10.0.0.2"])]


def test_an_error_beside_merge_keys_is_reported_at_its_line():
    p = one(MERGED.replace("SOURCE", "10.0.0.300"))
    assert (p.line, p.path) == (8, "workloads[1].source[0]"), str(p)


def test_an_unknown_key_with_brackets_is_reported_not_a_crash(tmp_path):
    # found by the fuzzer: pydantic's union tags contain "[", and a user's key may too
    p = tmp_path / "c.yaml"
    p.write_text("version: 1\nhost: {name: h, region: r}\nstate_di[r: /x\n")
    with pytest.raises(ConfigError) as e:
        load(str(p))
    assert any(pr.line == 3 and "unknown field 'state_di[r'" in pr.message
               for pr in e.value.problems), e.value.problems


# --- fixed port blocks (workloads[].blocks) -------------------------------------------

GATEWAY = HEAD + """defaults: {ports_per_workload: 1024}
egress_ips:
  - {id: ams-app-1, app: billing, ipv4: 203.0.113.140, ports: 10240-20479}
  - {id: ams-app-2, app: web, ipv4: 203.0.113.141}
  - {id: fra-app-1, app: billing, region: fra, ipv4: 203.0.113.150}
  - {id: ams-v6, app: billing, ipv6: 2001:db8:140::/64}
workloads:
  - {id: m-1, app: billing, source: [10.1.1.2], blocks: {ams-app-1: 10240-11263}}
"""
M2 = "  - {id: m-2, app: billing, source: [10.1.1.3], blocks: {BLOCK}}\n"


def test_fixed_blocks_are_read_on_both_yaml_paths_and_as_a_block_mapping():
    from egress_agent.config import _read_yaml, _ryml_data
    block_style = GATEWAY + ("  - id: m-2\n    app: billing\n    source: [10.1.1.3]\n"
                             "    blocks:\n      ams-app-1: 11264-12287\n")
    for text in (GATEWAY, block_style):
        assert _ryml_data(text) == _read_yaml(text, "f.yaml")[0]  # the fast path takes it
    cfg = parse(block_style, "f.yaml").config
    assert [w.blocks for w in cfg.workloads] == [{"ams-app-1": "10240-11263"},
                                                 {"ams-app-1": "11264-12287"}]
    assert cfg.fixed_blocks == {"ams-app-1": {"m-1": (10240, 11263), "m-2": (11264, 12287)}}
    assert parse(HEAD, "f.yaml").config.fixed_blocks == {}


@pytest.mark.parametrize("block, message", [
    ("ams-app-l: 11264-12287", "unknown egress IP 'ams-app-l'; did you mean 'ams-app-1'?"),
    ("ams-app-2: 11264-12287", "workload 'm-2' never leaves from egress IP 'ams-app-2' (not its "
                               "app's, its own, nor named by a policy matching it)"),
    ("fra-app-1: 11264-12287", "egress IP 'fra-app-1' is in region 'fra', not this host's ('ams'): "
                               "a block there is never used"),
    ("ams-v6: 11264-12287", "egress IP 'ams-v6' has no ipv4; port blocks are on IPv4"),
    ("ams-app-1: 11264-12288", "11264-12288 is 1025 ports; a block is defaults.ports_per_workload "
                               "(1024) ports"),
    ("ams-app-1: 1024-2047", "1024-2047 is outside the ports of egress IP 'ams-app-1' (10240-20479)"),
    ("ams-app-1: 10752-11775", "10752-11775 overlaps 10240-11263, the block of workload 'm-1' "
                               "(workloads[0]) on egress IP 'ams-app-1'; fixed blocks must not overlap"),
    ("ams-app-1: '10240'", "'10240' is not a port block; write it LO-HI, like 10240-11263"),
    ("ams-app-1: 11264", "11264 is not a port block; write it LO-HI, like 10240-11263"),
])
def test_a_fixed_block_the_allocator_could_not_give_is_an_error_at_its_line(block, message):
    p = one(GATEWAY + M2.replace("BLOCK", block))
    assert str(p) == f"f.yaml:11: workloads[1].blocks.{block.split(':')[0]}: {message}"


def test_overlapping_fixed_blocks_are_reported_at_the_later_one_whichever_starts_first():
    text = (GATEWAY + M2.replace("BLOCK", "ams-app-1: 12288-13311")
            + M2.replace("m-2", "m-3").replace("10.1.1.3", "10.1.1.4")
            .replace("BLOCK", "ams-app-1: 11776-12799"))
    assert str(one(text)) == (
        "f.yaml:12: workloads[2].blocks.ams-app-1: 11776-12799 overlaps 12288-13311, the block "
        "of workload 'm-2' (workloads[1]) on egress IP 'ams-app-1'; fixed blocks must not overlap")
