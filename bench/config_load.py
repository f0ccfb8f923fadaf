"""Config load + validation vs size: the PyYAML path against the agent's.

    .venv/bin/python bench/config_load.py [--sizes 10000,100000] [--runs 3]

For each size, with bench/gen_config.py's config (N machine workloads) written
to a temporary directory, the time to a validated Config (parse, pydantic
validation, the cross-field checks), median over --runs, in one process:
- pyyaml: the naive baseline, as the agent read configs before rapidyaml:
  PyYAML's C loader (libyaml) builds the data, the same validation follows,
  the cyclic GC left as the interpreter has it;
- load(): egress_agent.config.load() on the same YAML (rapidyaml where it is
  sure to give PyYAML's data, see config.py);
- load(), libyaml: load() with the rapidyaml path switched off, as text it
  declines is read (before issue 11's quoted scalars, any text with quotes);
- json: load() on the same config written as JSON;
- include, cold: load() of a main file whose workloads are in N/1000 include:
  fragments of 1,000 each;
- include, reload: a config.Reader's load() after one fragment changed (one
  workload moved to another source address), as the daemon reloads.
--ipv6: each egress IP gets an IPv6 range and each workload an IPv6 source,
quoted ("fd00::100") as the lab's config quotes them.
No root, no network: only files in a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import yaml  # noqa: E402

from egress_agent import config  # noqa: E402
from gen_config import FRAGMENT, config_text, fragments, source  # noqa: E402


def pyyaml_load(path: str) -> config.Config:
    """The old path: libyaml through PyYAML, then the same validation."""
    text = config._read_file(path)
    data = yaml.load(text, Loader=yaml.CSafeLoader)
    cfg = config.Config.model_validate(data)
    assert not config._check_semantics(cfg)
    return cfg


def timed(fn, runs: int, before=None) -> tuple[float, float]:
    """Median wall and CPU seconds (CPU: this process's own, which other sessions
    on the machine inflate far less than the wall clock)."""
    walls, cpus = [], []
    for _ in range(runs):
        if before:
            before()
        gc.collect()
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def libyaml_load(path: str) -> config.Loaded:
    """load() as it reads text the rapidyaml path declines."""
    fast, config._ryml_data = config._ryml_data, lambda text: None
    try:
        return config.load(path)
    finally:
        config._ryml_data = fast


def bench(n: int, runs: int, ipv6: bool) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="egress-yaml-bench-") as d:
        text = config_text(n, ipv6=ipv6)
        yml = os.path.join(d, "one.yaml")
        with open(yml, "w") as f:
            f.write(text)
        js = os.path.join(d, "one.json")
        with open(js, "w") as f:
            json.dump(yaml.load(text, Loader=yaml.CSafeLoader), f)
        assert pyyaml_load(yml) == config.load(yml).config == config.load(js).config \
            == libyaml_load(yml).config
        print(f"{n:,}: the rapidyaml path", "reads" if config._ryml_data(text) is not None
              else "DECLINES", "the YAML", flush=True)
        out["pyyaml"] = timed(lambda: pyyaml_load(yml), runs)
        out["load(), libyaml"] = timed(lambda: libyaml_load(yml), runs)
        out["load()"] = timed(lambda: config.load(yml), runs)
        out["json"] = timed(lambda: config.load(js), runs)

        os.makedirs(os.path.join(d, "inc"))
        main = fragments(text, os.path.join(d, "inc"))[0]
        out["include, cold"] = timed(lambda: config.load(main), runs)
        reader = config.Reader()
        reader.load(main)
        frag = os.path.join(d, "inc", "conf.d", f"{(n // FRAGMENT) // 2:04}.yaml")
        with open(frag) as f:
            original = f.read()
        edits = iter(range(10**6))

        def edit() -> None:  # one workload gets another source address, each run anew
            i = (n // FRAGMENT) // 2 * FRAGMENT
            with open(frag, "w") as f:
                f.write(original.replace(f"[{source(i)}", f"[{source(n + 1000 + next(edits))}"))
        out["include, reload"] = timed(lambda: reader.load(main), runs, before=edit)
        assert reader.load(main).config == config.load(main).config
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ipv6", action="store_true", help="quoted IPv6 ranges and sources too")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("load average before:", open("/proc/loadavg").read().split()[:3])
    results = {n: bench(n, args.runs, args.ipv6) for n in sizes}
    rows = list(next(iter(results.values())))
    print(f"config load + validation, median of {args.runs}: wall and CPU seconds, "
          "x = pyyaml's wall / this wall")
    print(f"{'path':<16}" + "".join(f"{f'{n:,}: wall':>16}{'cpu':>8}{'x':>8}" for n in sizes))
    for row in rows:
        cells = "".join(f"{results[n][row][0]:>16.3f}{results[n][row][1]:>8.3f}"
                        f"{results[n]['pyyaml'][0] / results[n][row][0]:>7.1f}x" for n in sizes)
        print(f"{row:<16}{cells}")
    for n in sizes:
        r = {k: v[0] for k, v in results[n].items()}
        print(f"{n:,}: load() {r['pyyaml'] / r['load()']:.1f}x faster than pyyaml, "
              f"{r['load(), libyaml'] / r['load()']:.1f}x faster than its libyaml path; "
              f"include reload {r['include, cold'] / r['include, reload']:.1f}x faster than a cold load")
    print("load average after:", open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    main()
