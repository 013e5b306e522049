"""The benchmark scripts run (their --smoke settings) and their arithmetic is right; they time nothing here."""

import json

import pytest
import torch

from benchmarks import latency, macs_agreement, quality, readme, train_step


def test_macs_agreement_smoke_agrees_exactly(tmp_path):
    rows = macs_agreement.run("smoke", tmp_path)["rows"]
    assert {row["model"] for row in rows} == {"tiny-vit", "tiny-swin"}
    assert all(row["relative_error"] == 0 for row in rows)
    assert (tmp_path / "macs_agreement.png").stat().st_size > 0


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("benchmark", [latency, train_step])
def test_timing_benchmarks_smoke(benchmark, tmp_path, restore_threads):
    benchmark.main(["--smoke", "--output-dir", str(tmp_path), "--threads", "1"])
    data = json.loads((tmp_path / f"{benchmark.NAME}.json").read_text())
    assert data["environment"]["threads"] == 1 and data["rows"]
    assert "dense" in benchmark.markdown(data["rows"])


def test_uniform_curve_interpolation():
    uniform = [(0.3, 0.70), (0.5, 0.90), (0.7, 0.95)]
    assert quality.uniform_macs_at(0.60, uniform) == 0.3  # the smallest point already reaches it
    assert quality.uniform_macs_at(0.80, uniform) == pytest.approx(0.4)
    assert quality.uniform_macs_at(0.95, uniform) == pytest.approx(0.7)
    assert quality.uniform_macs_at(0.96, uniform) is None  # never reached


def test_shapes_dataset_is_written_once(tmp_path):
    directory = quality.write_shapes(tmp_path / "shapes", per_class=2)
    assert sorted(p.name for p in directory.iterdir()) == sorted(quality.SHAPES)
    assert all(len(list((directory / kind).glob("*.png"))) == 2 for kind in quality.SHAPES)
    quality.write_shapes(tmp_path / "shapes", per_class=5)  # complete: left as it is
    assert len(list((directory / "disc").glob("*.png"))) == 2


def test_readme_blocks_are_replaced_or_named():
    content = "intro\n<!-- benchmark:x -->\nold\n<!-- /benchmark:x -->\nend"
    assert readme.replace_block(content, "x", "new") == "intro\n<!-- benchmark:x -->\nnew\n<!-- /benchmark:x -->\nend"
    with pytest.raises(ValueError, match="no <!-- benchmark:y -->"):
        readme.replace_block(content, "y", "new")
