"""benchmarks/knn_probe.py: the two-view runs' k-NN probe on any backbones, one line each."""

import torch
import torchvision


def test_probe_of_two_backbones_prints_one_line_each(bench_script, capsys):
    probe = bench_script("knn_probe")
    assert probe.main(["random", "random", "--arch", "resnet18", "--classes", "3", "--per-class", "2",
                       "--size", "32", "--points", "2000", "--k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("k-NN top-1, 3 held-out systems (bank seed 1000003) x 2 renders at 32 px")
    values = [float(line.split()[0]) for line in lines[1:]]
    assert len(values) == 2 and values[0] == values[1]  # the same backbone on the same fixed set
    assert all(0.0 <= v <= 1.0 for v in values)


def test_a_missing_backbone_is_one_line(bench_script, capsys, tmp_path):
    assert bench_script("knn_probe").main([str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_an_imagenet_file_takes_the_arch_option(bench_script, capsys, tmp_path):
    weights = tmp_path / "resnet18.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), weights)
    assert bench_script("knn_probe").main([f"imagenet:{weights}", "--arch", "resnet18", "--classes", "3",
                                           "--per-class", "2", "--size", "32", "--points", "2000", "--k", "2"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()[1:]
    assert line.endswith(f"imagenet:{weights}") and 0.0 <= float(line.split()[0]) <= 1.0
