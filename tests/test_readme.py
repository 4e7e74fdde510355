"""The README's commands are the ones CI runs and the ones the configs support."""

import re

from tests.conftest import CONF, METHOD_CONFIGS, REPO


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
