"""Bad input a new user might try: one line naming the path, exit status 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from ad_eval.cli import main as ad_eval
from ad_eval.synthetic import make_mvtec_like
from fractal_pretrain.cli import main as fractal_pretrain


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_mvtec_like(tmp_path_factory.mktemp("synth"), categories=("object",), n_train=3, n_test_good=2,
                           n_test_defect=1, size=32)


def run_args(root: Path, out: Path, backbone: str = "random") -> list[str]:
    return ["run", "--method", "panda", "--dataset", "mvtec", "--root", str(root), "--category", "object",
            "--backbone", backbone, "--arch", "resnet18", "--size", "32", "--device", "cpu", "--out", str(out)]


def one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_ad_eval_run_out_is_a_file(data_root, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("keep me")
    assert ad_eval(run_args(data_root, out)) == 2
    assert str(out) in one_line(capsys, "ad-eval") and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert ad_eval(run_args(data_root, out / "sub")) == 2  # a file on the way is the same error
    assert f"{out} is a file" in one_line(capsys, "ad-eval")


def test_fractal_pretrain_export_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "shards"
    out.write_text("keep me")
    args = ["export", "--recipe", "anderson", "--num", "2", "--size", "16", "--shard-size", "2", "--out", str(out)]
    assert fractal_pretrain(args) == 2
    assert str(out) in one_line(capsys, "fractal-pretrain") and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


@pytest.mark.parametrize("content", [b"just some text\n", b"PK\x03\x04 not really a zip"])
def test_backbone_that_is_not_a_checkpoint(data_root, tmp_path, capsys, content):
    stray = tmp_path / "notes.txt"
    stray.write_bytes(content)
    out = tmp_path / "out"
    assert ad_eval(run_args(data_root, out, backbone=str(stray))) == 2
    err = one_line(capsys, "ad-eval")
    assert f"{stray}: not a backbone checkpoint" in err and "json" not in err.split("(")[0]
    assert "weights_only" not in err and len(err) < 400  # was torch's 700-character advice to unpickle it anyway
    assert not out.exists()  # checked before the cell starts: no failure record either


@pytest.mark.parametrize(("extra", "named"), [
    (["--crop", "100"], "crop=100"),  # larger than --size 32
    (["--device", "gpu"], "device='gpu'"),  # not a device form: was a Lightning traceback
    (["--device", "cuda:x"], "device='cuda:x'"),
])
def test_ad_eval_run_bad_crop_or_device(data_root, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert ad_eval(run_args(data_root, out) + extra) == 2
    assert named in one_line(capsys, "ad-eval")
    assert not out.exists()  # checked before the cell starts: no failure record either


def test_ad_eval_run_cuda_without_a_gpu(data_root, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = tmp_path / "out"
    assert ad_eval(run_args(data_root, out) + ["--device", "cuda"]) == 2
    assert "no CUDA device is visible" in one_line(capsys, "ad-eval")
    assert not out.exists()


def test_grid_bad_device_form(tmp_path):
    from ad_eval.grid import GridError, load_grid

    config = tmp_path / "grid.yaml"
    config.write_text("datasets: {mvtec: {root: data, categories: [object]}}\n"
                      "backbones: {Random: {spec: random, arch: resnet18}}\nmethods: {panda: {}}\ndevice: gpu\n")
    with pytest.raises(GridError, match=r"device='gpu': must be auto, cpu, cuda or cuda:N"):
        load_grid(config, base_dir=tmp_path)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot write in: a read-only one, or (root ignores the bits) /sys."""
    import os
    import tempfile

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder, Path("/sys")]
    for candidate in candidates:
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            yield candidate
            break
    else:
        pytest.skip(f"no unwritable folder here (euid {os.geteuid()})")
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["run", "synthetic", "report", "export"])
def test_out_folder_not_writable(data_root, tmp_path, capsys, unwritable, command):
    out = unwritable / "new" / "out"
    if command == "run":  # checked before the cell runs (was: a PermissionError traceback after the work)
        status = ad_eval(run_args(data_root, out))
    elif command == "synthetic":
        status = ad_eval(["synthetic", "--out", str(out)])
    elif command == "report":
        status = ad_eval(["report", "--results", str(tmp_path), "--out", str(out)])
    else:
        status = fractal_pretrain(["export", "--recipe", "anderson", "--num", "2", "--size", "16", "--shard-size",
                                   "2", "--out", str(out)])
    assert status == 2
    assert f"--out {out}: cannot write in {unwritable}" in one_line(capsys, "fractal-pretrain" if command == "export"
                                                                      else "ad-eval")
    assert not (unwritable / "new").exists()


def test_imagenet_file_of_another_arch(data_root, tmp_path, capsys):
    """A resnet18 weights file given with --arch resnet34: one line, and no failure record (was one)."""
    import torch
    import torchvision

    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "out"
    args = run_args(data_root, out, backbone=f"imagenet:{weights}")
    args[args.index("--arch") + 1] = "resnet34"
    assert ad_eval(args) == 2
    assert f"{weights} holds resnet18-shaped weights but arch=resnet34" in one_line(capsys, "ad-eval")
    assert not out.exists()
