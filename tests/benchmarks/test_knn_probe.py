"""benchmarks/knn_probe.py: the two-view runs' k-NN probe on any backbones, one line each."""

import pytest
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


def test_view_pairs_rendered_in_chunks_equal_one_render_first_views_then_second(bench_script):
    from fractal_pretrain.recipes import get_recipe
    from fractal_pretrain.render.renderer import make_renderer
    from fractal_pretrain.train.knn import PROBE_BATCH, PROBE_EPOCH, probe_seed

    probe = bench_script("knn_probe")
    pairs = PROBE_BATCH // 2 + 3  # two chunks
    chunked = probe.render_view_pairs(pairs, size=16, seed=0, device="cpu", num_points=300)
    recipe = get_recipe("selfsup", {"num_classes": pairs, "num_points": 300, "chains": 256})
    whole, _ = make_renderer(recipe, size=16, seed=probe_seed(0), device="cpu").render_tensor(
        torch.arange(pairs).numpy(), PROBE_EPOCH)
    assert chunked.shape == (2 * pairs, 3, 16, 16) and torch.equal(chunked, whole)


def test_view_retrieval_is_one_for_own_pairs_and_zero_for_swapped_ones(bench_script):
    probe = bench_script("knn_probe")
    first = torch.eye(6)
    assert probe.view_top1(torch.cat([first, first + 0.01])) == 1.0
    assert probe.view_top1(torch.cat([first, first.roll(1, dims=0)])) == 0.0


def test_views_task_prints_one_line_each_and_a_bad_override_is_one_line(bench_script, capsys):
    probe = bench_script("knn_probe")
    assert probe.main(["random", "--arch", "resnet18", "--task", "views", "--classes", "4", "--size", "32",
                       "--points", "500", "--overrides", '{"background": false}']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("second-view retrieval top-1, 4 held-out selfsup pairs") and len(lines) == 2
    assert 0.0 <= float(lines[1].split()[0]) <= 1.0
    assert probe.main(["random", "--arch", "resnet18", "--task", "views", "--overrides", '{"bogus": 1}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]


def test_overrides_the_probe_sets_itself_are_refused(bench_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_script("knn_probe").main(["random", "--task", "views", "--overrides", '{"num_points": 5}'])
    assert exit_info.value.code == 2 and "'num_points' is set by the probe" in capsys.readouterr().err
