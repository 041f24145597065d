"""The shipped job configs agree with each other: what an eval or adapt config reads from ``runs/`` is what a
pretrain or adapt config writes there, and the commands in their header comments name files that exist.
(Each config's own parsing is tested beside its command: test_train.py, test_adapt_cli.py, test_grid.py.)"""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"


def run_dirs(kind: str) -> dict[str, str]:
    """trainer.default_root_dir -> config name, for every config in jobs/<kind>/."""
    found = {}
    for path in sorted((JOBS / kind).glob("*.yaml")):
        root = yaml.safe_load(path.read_text())["trainer"]["default_root_dir"]
        assert root not in found, f"{path.name} and {found[root]} both write {root}"
        found[root] = path.name
    return found


def run_dir_of(spec: str) -> str | None:
    """The run folder a ``runs/...`` file path lies in (None for other specs: random, imagenet:..., /data/...)."""
    return str(Path(spec).parent) if spec.startswith("runs/") else None


@pytest.mark.parametrize("config", sorted((JOBS / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_eval_backbones_and_projectors_are_what_a_job_writes(config):
    pretrained, adapted = run_dirs("pretrain"), run_dirs("adapt")
    for label, backbone in yaml.safe_load(config.read_text())["backbones"].items():
        folder = run_dir_of(backbone["spec"])
        assert folder is None or (folder in pretrained and backbone["spec"].endswith("/backbone.pt")), \
            f"{label}: spec {backbone['spec']} is not the backbone.pt of any jobs/pretrain config"
        if "projector" in backbone:  # projector.pt or its folder (ad_eval reads either)
            projector = backbone["projector"]
            folder = run_dir_of(projector) if projector.endswith("/projector.pt") else projector.rstrip("/")
            assert folder in adapted, f"{label}: projector {projector} is not what any jobs/adapt config writes"


@pytest.mark.parametrize("config", sorted((JOBS / "adapt").glob("*.yaml")), ids=lambda p: p.name)
def test_adapt_backbone_is_what_a_pretrain_job_writes(config):
    spec = yaml.safe_load(config.read_text())["model"]["backbone"]
    folder = run_dir_of(spec)
    assert folder is None or (folder in run_dirs("pretrain") and spec.endswith("/backbone.pt")), spec


@pytest.mark.parametrize("config", sorted(JOBS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_header_commands_name_existing_files_and_the_config_itself(config):
    comments = "\n".join(line for line in config.read_text().splitlines() if line.lstrip().startswith("#"))
    for named in re.findall(r"\b((?:jobs|slurm|benchmarks)/[\w./-]+\w)", comments):
        assert (REPO / named).exists(), f"{config.name} names {named}, which does not exist"
    own = str(config.relative_to(REPO))
    command = {"pretrain": r"fractal-pretrain fit --config (\S+)", "adapt": r"fractal-pretrain adapt --config (\S+)",
               "eval": r"ad-eval grid --config (\S+)"}[config.parent.name]
    runs = re.findall(command, comments) + re.findall(r"slurm/pretrain\.sbatch (\S+)", comments)
    assert runs and set(runs) == {own}, f"{config.name}: its header runs {runs}, not {own}"
    for line in comments.splitlines():  # the sbatch script runs `fit` unless told otherwise
        if "pretrain.sbatch jobs/" in line:
            assert ("SUBCOMMAND=adapt" in line) == (config.parent.name == "adapt"), line


def test_eval_headers_report_what_their_grid_wrote():
    for config in sorted((JOBS / "eval").glob("*.yaml")):
        text = config.read_text()
        outs = re.findall(r"ad-eval grid .*--out (\S+)", text)
        results = re.findall(r"ad-eval report --results (\S+)", text)
        assert set(results) <= set(outs), f"{config.name}: report reads {results}, grid writes {outs}"
        labels = set(yaml.safe_load(text)["backbones"])
        for listed in re.findall(r"--backbones (\S+)", text):
            assert set(listed.split(",")) <= labels, f"{config.name}: --backbones {listed}, config has {labels}"
        for control in re.findall(r"--control (\S+)", text):
            assert control in labels, f"{config.name}: --control {control}, config has {labels}"
