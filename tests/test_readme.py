"""The README's and docs/' commands are the ones CI runs and the ones the configs support; their figures are the
records'; the README stays a page a newcomer reads in minutes."""

import importlib.metadata
import os
import re

import pytest

from tests.conftest import CONF, METHOD_CONFIGS, REPO, train_losses


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command, _ = readme_commands()
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [test_command]


def test_main_job_command_names_an_existing_experiment():
    _, main_job = readme_commands()
    experiment = re.search(r"experiment=(\w+)", main_job).group(1)
    assert (CONF / "experiment" / f"{experiment}.yaml").exists()


def test_readme_lists_every_method():
    text = (REPO / "README.md").read_text()
    missing = [name for name in METHOD_CONFIGS if f"`{name}`" not in text]
    assert not missing, f"README.md does not name conf/method/ config(s) {missing}: add each, in backticks, to its list"


def test_readme_results_table_is_the_generated_one():
    generated = (REPO / "results" / "quickstart" / "tables" / "main.md").read_text()
    rows = [line for line in generated.splitlines() if line.startswith("|")]
    readme = (REPO / "README.md").read_text()
    assert "\n".join(rows) in readme


def test_the_worked_example_of_a_new_adapter_runs(monkeypatch, tiny_spec, cpu):
    """docs/adding_a_method.md: the IA3 class and preset as printed, wired as steps 2-3 say, train and are recorded."""
    import textwrap

    import yaml
    from omegaconf import OmegaConf

    import methods.adapters
    import methods.compose as compose
    from methods import registry
    from methods.base import LoadContext

    text = (REPO / "docs" / "adding_a_method.md").read_text()
    code = re.search(r"```python\n(   class IA3Adapter.*?)```", text, flags=re.S).group(1)
    registry.discover()
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))  # the class registers for this test only
    namespace = dict(vars(methods.adapters))
    exec(textwrap.dedent(code), namespace)  # step 1, as printed: the class registers itself (step 2)
    preset = re.search(r"```yaml\n(   # IA3.*?)```", text, flags=re.S).group(1)  # step 3, as printed
    cfg = OmegaConf.create(yaml.safe_load(textwrap.dedent(preset)))
    cfg.compute_dtype = "float32"
    compose.register_method_name_resolver()
    method = compose.build(**{k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"})
    assert method.name == "ia3_nf4"
    model = method.add_adapters(method.load_base(tiny_spec, LoadContext(cpu, model_spec=tiny_spec)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    losses = train_losses(model, steps=3)
    assert losses[-1] < losses[0]
    record = method.describe(model)
    assert record["trainable_params"] == sum(p.numel() for p in trainable) > 0
    assert record["adapter_bytes"] == 4 * record["trainable_params"]  # counted as adapter bytes without an edit


def test_readme_axes_matrix_is_what_compose_accepts():
    """The README's base x adapter matrix: a name where methods/compose.py builds the pair, "—" where it refuses."""
    from methods.compose import method_name, valid_adapters
    from methods.registry import adapter_kinds, base_names

    text = (REPO / "README.md").read_text()
    header = re.search(r"^\| base \\ adapter \|.*\|$", text, flags=re.M).group(0)
    ADAPTERS = re.findall(r"`(\w+)`", header)  # the registered adapters, each a column, in the README's order
    assert sorted(ADAPTERS) == sorted(adapter_kinds())
    BASES, VALID_ADAPTERS = base_names(), {base: valid_adapters(base) for base in base_names()}
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    covered = []
    for row in rows:
        bases_cell, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        bases = re.findall(r"`(\w+)`", bases_cell)
        covered += bases
        for base in bases:
            for adapter, shown in zip(ADAPTERS, cells):
                assert (shown != "—") == (adapter in VALID_ADAPTERS[base]), (base, adapter)
        for adapter, shown in zip(ADAPTERS, cells):
            if shown != "—":
                assert shown == method_name(bases[0], adapter)
    assert sorted(covered) == sorted(BASES)


def test_the_documented_sharded_65b_command_passes_the_checks_a_run_makes_first():
    """docs/sharded_training.md's QLoRA Table 4 BFloat16 row at 65B: its overrides compose, train sharded settings that
    the harness accepts on a method that shards, on the Slurm launcher that gives each rank's task a GPU."""
    from hydra.utils import instantiate

    from experiments.harness.train import TrainSettings
    from tests.conftest import compose_config

    text = (REPO / "docs" / "sharded_training.md").read_text()
    block = re.search(r"python -m experiments\.run -m experiment=qlora_table4 launcher=slurm.*?\n\n", text, re.S)
    assert block, "docs/sharded_training.md lost its sharded 65B command"
    overrides = block.group(0).replace("\\\n", " ").split()[4:]  # after "python -m experiments.run -m"
    cfg = compose_config(*overrides, hydra_node=True)
    settings = TrainSettings(**cfg.train)
    assert (settings.strategy, settings.nproc, settings.batch_size * settings.grad_accum) == ("fsdp", 4, 64)
    instantiate(cfg.method, _convert_="all").prepare_sharding()  # raises if the method cannot shard
    assert cfg.model.name_or_path == "huggyllama/llama-65b" and cfg.hydra.launcher.gpus_per_task == 1


def lock_pins(name: str) -> dict[str, str]:
    """requirements/<name>: package (normalised) -> exact version."""
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, version = line.split("==")  # exact versions only: a range is no lock
            pins[re.sub(r"[-_.]+", "-", package).lower()] = version
    return pins


def test_both_readme_commands_install_the_locked_stack():
    test_command, main_job = readme_commands()
    assert "pip install -c requirements/test.lock -e '.[test,gptq,hqq,torchao]'" in test_command
    assert "pip install -c requirements/cpu.lock -e ." in main_job
    test_lock, cpu_lock = lock_pins("test.lock"), lock_pins("cpu.lock")
    assert cpu_lock["torch"] == re.search(r"torch==([\w.+]+)", main_job).group(1)  # the CPU wheel named first
    for package in ("transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "gguf"):
        assert cpu_lock[package] == test_lock[package], package  # the main job's figures on the tested stack


@pytest.mark.skipif(os.environ.get("QPEFT_UNLOCKED") == "1", reason="scripts/update_lock.sh: the newest stack")
def test_the_suite_runs_on_the_locked_stack():
    """What the README's test command installs is what the lock says (a stale lock fails here, not in CI)."""
    from experiments.harness.record import PACKAGES

    pins = lock_pins("test.lock")
    installed = {name: importlib.metadata.version(name) for name in PACKAGES if re.sub(r"[-_.]+", "-", name) in pins}
    expected = {name: pins[re.sub(r"[-_.]+", "-", name)] for name in installed}
    assert installed == expected


def test_every_marked_figure_is_what_the_records_say():
    """The README's and docs/' figures are written by analysis/readme_figures.py from results/, never typed."""
    from analysis.readme_figures import main

    assert main(["--check"]) == 0


def test_the_readme_is_short_and_links_every_docs_page():
    """At most 300 lines a newcomer reads in minutes; every page under docs/ is reachable from it."""
    text = (REPO / "README.md").read_text()
    assert text.count("\n") <= 300
    unlinked = [page.name for page in (REPO / "docs").glob("*.md") if f"](docs/{page.name})" not in text]
    assert not unlinked, f"README.md links no docs/ page {unlinked}"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(REPO)}: {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text())
        if not (page.parent / target).exists()
    ]
    assert not broken, broken
