"""Preloaded, and still clean: on ONE datascience container, tasks that change the preloaded modules leave
nothing for the next task, again and again. Every task is a fresh fork of the pristine template, so the
next one sees the state the image started with (and fresh random seeds, as a fresh interpreter would)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import Service, start_service, stop_service

pytestmark = pytest.mark.docker

TIERS = {"tiers": [{"name": "ds", "cpu": 1, "ram": "768MiB", "storage": "64MiB", "min_idle": 1, "max_size": 1,
                    "image": "datascience"}]}

# Changes everything a task could hope the next one inherits, and says what the seeded generators gave.
MUTATE = """
import builtins, json, os, random, socket, sys
import matplotlib, matplotlib.pyplot as plt, numpy as np, pandas as pd, scipy
pd.options.display.max_rows = 3
pd.set_option('display.precision', 1)
np.zeros = lambda *args, **kwargs: 'poisoned'
np.set_printoptions(precision=1)
np.random.seed(42)
random.seed(42)
sys.modules['json'] = 'poisoned'
sys.modules['warmpool_poison'] = object()
sys.path.insert(0, '/tmp/work')
matplotlib.rcParams['lines.linewidth'] = 42
plt.style.use('ggplot')
plt.figure()
plt.plot([1, 2])
builtins.len = lambda obj: -1
os.environ['POISON'] = '1'
scipy.POISON = True
print(np.random.rand(), random.random())
"""

CHECK = """
import json, os, random, socket, sys
import matplotlib, matplotlib.pyplot as plt, numpy as np, pandas as pd, scipy
print(json.dumps({
    "host": socket.gethostname(),
    "max_rows": pd.options.display.max_rows, "precision": pd.get_option('display.precision'),
    "zeros": np.zeros(2).tolist(), "np_print": np.get_printoptions()['precision'],
    "json_module": type(sys.modules['json']).__name__, "poison_module": 'warmpool_poison' in sys.modules,
    "path_has_work": '/tmp/work' in sys.path,
    "linewidth": matplotlib.rcParams['lines.linewidth'], "facecolor": matplotlib.rcParams['axes.facecolor'],
    "figures": plt.get_fignums(), "len": len([1, 2, 3]), "env": 'POISON' in os.environ,
    "scipy": hasattr(scipy, 'POISON'), "np_random": np.random.rand(), "random": random.random(),
}))
"""

SEEDED_42 = (0.3745401188473625, 0.6394267984578837)  # np.random.seed(42) then rand(); random.seed(42) then random()


@pytest.fixture(scope="module")
def ds(docker_client, tmp_path_factory) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("preload")
    tiers_path = work / "tiers.json"
    tiers_path.write_text(json.dumps(TIERS))
    svc = start_service(work, tiers_path, ready_timeout_s=120)
    svc.defaults = {"image": "datascience"}
    yield svc
    stop_service(svc, docker_client)


def run_ok(service: Service, code: str) -> dict:
    response = service.execute(code)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", (body["stderr"][-2000:], body["message"])
    return body


def test_a_task_that_changes_the_preloaded_modules_leaves_nothing_for_the_next(ds):
    hosts, draws = set(), []
    for _ in range(4):
        mutated = run_ok(ds, MUTATE)
        assert tuple(map(float, mutated["stdout"].split())) == SEEDED_42  # the seeds took, in that task
        # (Its own figure does not come back: with `len` replaced, its process can no longer collect it.
        # A task can break its own result, and only its own.)
        checked = run_ok(ds, CHECK)
        seen = json.loads(checked["stdout"])
        hosts.add(seen.pop("host"))
        draws.append((seen.pop("np_random"), seen.pop("random")))
        assert seen == {"max_rows": 60, "precision": 6, "zeros": [0.0, 0.0], "np_print": 8, "json_module": "module",
                        "poison_module": False, "path_has_work": False, "linewidth": 1.5, "facecolor": "white",
                        "figures": [], "len": 3, "env": False, "scipy": False}
        assert checked["files"] == []  # the figure the other task left open was its own
    assert len(hosts) == 1, f"the tier has one container: every task must have run on it, got {hosts}"
    # Fresh seeds in every task, as a fresh interpreter has: neither the seeded draws nor one shared sequence.
    assert all(draw != SEEDED_42 for draw in draws)
    assert len({np_draw for np_draw, _ in draws}) == len(draws) and len({r for _, r in draws}) == len(draws)


def test_the_fresh_container_and_every_reset_are_clean(ds):
    """PID 1 imports matplotlib with its config dir on /tmp; that dir must be gone before the first clean
    check (or every fresh container would be replaced) and be there, empty but for the font list, for each task."""
    code = ("import matplotlib, os\nprint(sorted(os.listdir('/tmp')), os.listdir(matplotlib.get_cachedir()), "
            "matplotlib.get_cachedir(), matplotlib.get_backend(), os.environ['MPLCONFIGDIR'])")
    first = run_ok(ds, code)
    assert first["stdout"].startswith("['home', 'matplotlib', 'work'] ['fontlist-v")
    assert first["stdout"].endswith("] /tmp/matplotlib Agg /tmp/matplotlib\n")
    metrics = ds.client.get("/metrics").text
    replaced = [line for line in metrics.splitlines() if line.startswith("warmpool_container_replacements_total{")]
    assert all(line.endswith(" 0.0") for line in replaced), replaced  # no container was found unclean
