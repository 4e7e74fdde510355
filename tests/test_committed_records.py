"""The committed records stand for the configurations a fresh run composes today: same configuration, same run
id, so a sweep prints them as reference rows and skips nothing it should run."""

import json

import pytest
from omegaconf import OmegaConf

from experiments.harness.config import CONF, compose_config
from experiments.harness.record import run_id_of
from tests.conftest import REPO

# Folders whose records predate the config's base/adapter axes (and export, eval.fidelity), kept as the
# figures they are until regenerated: each needs its experiment run again on a clean commit (the README
# says how long). A folder regenerated must leave this list: the test below fails while it is listed.
STALE_UNTIL_REGENERATED: dict[str, str] = {}


def committed_records() -> dict[str, list[dict]]:
    folders = {}
    for path in sorted((REPO / "results").glob("*/*.json")):
        record = json.loads(path.read_text())
        if "run_id" in record and "config" in record:
            folders.setdefault(path.parent.name, []).append(record)
    return folders


def preset_of(method: dict) -> str:
    """The conf/method preset a record's method came from: its own name, or, where a sweep set the preset's
    axes (QA-LoRA on a GPTQ base runs as qalora_gptq), the one preset of its adapter."""
    if (CONF / "method" / f"{method['name']}.yaml").exists():
        return method["name"]
    files = sorted((CONF / "method").glob("*.yaml"))
    presets = [path.stem for path in files if OmegaConf.load(path).get("adapter") == method["adapter"]]
    assert len(presets) == 1, f"{method['name']}: no preset of that name, and adapter {method['adapter']} has {presets}"
    return presets[0]


def fresh_run_id(record: dict) -> str:
    """The id a run of the record's configuration computes today: the experiment and preset it names,
    composed now, with every value the record holds (what the sweep and auto resolved) over them."""
    config = record["config"]
    experiment = config.get("experiment_name")
    preset = preset_of(config["method"])
    fresh = compose_config(*([f"experiment={experiment}"] if experiment else []), f"method={preset}")
    OmegaConf.set_struct(fresh, False)
    return run_id_of(OmegaConf.merge(fresh, OmegaConf.create(config)))


@pytest.mark.parametrize("folder", sorted(committed_records()))
def test_a_committed_record_has_the_id_a_fresh_run_of_its_configuration_computes(folder):
    records = committed_records()[folder]
    stale = [r["run_id"] for r in records if fresh_run_id(r) != r["run_id"]]
    if folder in STALE_UNTIL_REGENERATED:
        assert stale, f"results/{folder} matches today's ids: take it off STALE_UNTIL_REGENERATED"
    else:
        assert not stale, f"results/{folder}: {stale} predate today's config; regenerate them"


def test_the_main_job_finds_its_reference_rows_on_this_cpu():
    """The README's main job prints the committed records beside its own, matched by run id: whichever path
    compute_dtype auto takes on this CPU (native bfloat16 or float32), each of its runs has its reference."""
    import torch

    from core.compute_dtype import resolve_auto_compute_dtype
    from experiments.harness.sweep_summary import load_reference

    if "quickstart" in STALE_UNTIL_REGENERATED:
        pytest.skip(f"results/quickstart awaits its regeneration: {STALE_UNTIL_REGENERATED['quickstart']}")

    experiment = compose_config("experiment=quickstart", hydra_node=True)
    methods = str(experiment.hydra.sweeper.params.method).split(",")
    reference = load_reference(str(REPO / "results" / "quickstart"))
    for method in methods:
        cfg = compose_config("experiment=quickstart", f"method={method}")
        resolve_auto_compute_dtype(cfg.method, torch.device("cpu"))
        assert run_id_of(cfg) in reference, f"{method}: no committed reference for this CPU's compute path"


def test_the_sweep_table_says_which_compute_dtype_each_row_and_its_reference_row_used():
    from experiments.harness.summary import format_table
    from experiments.harness.sweep_summary import load_reference

    reference = load_reference(str(REPO / "results" / "quickstart"))
    for record in reference.values():  # a fresh run of the same configuration, here the committed one again
        header, _, row, reference_row = format_table([record], reference).splitlines()
        compute = header.split().index("compute")
        assert row.split()[compute] == record["method"]["compute_dtype"] in ("bfloat16", "float32")
        assert reference_row.split()[compute] == record["method"]["compute_dtype"]
