"""config._validate_kept: the Reader's data (models it kept, plain data for the
rest) validates to the config Config.model_validate makes of it, and a bad plain
entry still fails (the Reader then hands the file to load(), which says where)."""

import pytest
from pydantic import ValidationError

from egress_agent import config as C

TEXT = """version: 1
host: {name: h1, region: r1}
egress_ips:
  - {id: ip1, app: web, ipv4: 203.0.113.10}
workloads:
  - {id: w1, app: web, source: [10.0.1.2]}
  - {id: w2, app: web, cgroup: batch.slice}
policies:
  - {name: p, match: {ports: [443]}, egress: default}
"""


def kept_data(cfg):
    data = cfg.model_dump(exclude_unset=True)
    for k in ("egress_ips", "workloads", "policies"):
        data[k] = list(getattr(cfg, k))
    return data


def test_kept_models_and_plain_entries_validate_as_the_whole_config_does():
    cfg = C.parse(TEXT).config
    data = kept_data(cfg)
    data["workloads"].append({"id": "w3", "app": "web", "source": ["10.0.1.3"]})
    data["policies"][0] = {"name": "p", "match": {"ports": [80]}, "egress": "drop"}
    got = C._validate_kept(data)
    assert got == C.Config.model_validate(data)
    assert got.workloads[0] is cfg.workloads[0]  # kept, not copied
    assert got.workloads[2].source == ["10.0.1.3"] and got.policies[0].egress == "drop"


@pytest.mark.parametrize("bad", [
    {"id": "w3", "app": "web"},  # neither source nor cgroup: Workload._kind
    {"id": "w3", "app": "web", "source": ["not-an-address"]},
    "w3",
])
def test_a_bad_plain_entry_fails_as_in_the_whole_config(bad):
    data = kept_data(C.parse(TEXT).config)
    data["workloads"].append(bad)
    with pytest.raises(ValidationError):
        C.Config.model_validate(data)
    with pytest.raises(ValidationError):
        C._validate_kept(data)
