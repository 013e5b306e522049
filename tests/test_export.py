import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import make_model, pixel_values
from transformers import AutoModelForImageClassification, ViTImageProcessor

import flora_hf
from flora_hf import FloraSupernetForImageClassification, count_macs, count_params
from flora_hf.checkpoints import load_compact
from flora_hf.errors import CheckpointError
from flora_hf.modeling_flora import COMPACT_CLASSES, LowRankLinear


def exported(kind, seed=0):
    supernet = FloraSupernetForImageClassification.from_dense(make_model(kind))
    subnet = supernet.space.sample(random.Random(seed))
    supernet.set_subnet(subnet)
    size = supernet.model.config.image_size
    processor = ViTImageProcessor(size={"height": size, "width": size})
    return supernet, subnet, supernet.export_subnet(subnet, image_processor=processor)


def test_export_matches_supernet_logits(kind):
    supernet, subnet, compact = exported(kind)
    assert type(compact) is COMPACT_CLASSES[type(supernet.model)]
    x = pixel_values(supernet.model)
    with torch.no_grad():
        torch.testing.assert_close(compact(pixel_values=x).logits, supernet(pixel_values=x).logits, atol=1e-5, rtol=0)
    low_rank = [m for m in compact.modules() if isinstance(m, LowRankLinear)]
    assert low_rank, "a sampled subnet has low-rank layers"
    assert not any(type(m).__name__ == "FloraSuperLinear" for m in compact.modules())
    ranks = compact.config.flora_ranks
    assert set(ranks) == set(subnet)
    assert sum(r is not None for r in ranks.values()) == len(low_rank)


def test_full_rank_export_is_dense():
    supernet = FloraSupernetForImageClassification.from_dense(make_model("vit"))
    compact = supernet.export_subnet(supernet.space.max_subnet())
    assert set(compact.config.flora_ranks.values()) == {None}
    assert count_params(compact) == count_params(make_model("vit"))
    assert count_macs(compact) == count_macs(make_model("vit"))


def test_compact_is_smaller_exactly_as_counted():
    supernet, subnet, compact = exported("vit")
    dense = make_model("vit")
    assert sum(p.numel() for p in compact.parameters()) == count_params(supernet, subnet) < count_params(dense)
    assert count_macs(compact) == count_macs(supernet, subnet) < count_macs(dense)


def test_saved_files_and_three_ways_of_loading(tmp_path, kind):
    supernet, subnet, compact = exported(kind)
    compact.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_flora.py", "preprocessor_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == f"modeling_flora.{type(compact).__name__}"
    assert config["flora_ranks"] == compact.config.flora_ranks
    x = pixel_values(supernet.model)
    with torch.no_grad():
        expected = compact(pixel_values=x).logits
        for loaded in (type(compact).from_pretrained(tmp_path), AutoModelForImageClassification.from_pretrained(tmp_path)):
            assert type(loaded) is type(compact)
            torch.testing.assert_close(loaded(pixel_values=x).logits, expected, atol=1e-5, rtol=0)


REMOTE_CODE_SCRIPT = """
import sys
sys.modules["flora_hf"] = None  # make `import flora_hf` fail, as on a machine without it
try:
    import flora_hf
except ImportError:
    pass
else:
    raise SystemExit("flora_hf is importable")
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
path = sys.argv[1]
model = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)
assert "flora_hf" not in type(model).__module__, type(model).__module__
x = torch.load(sys.argv[2], weights_only=True)
print("MAXDIFF", (model(pixel_values=x).logits - torch.load(sys.argv[3], weights_only=True)).abs().max().item())
classifier = pipeline("image-classification", model=path, trust_remote_code=True)
result = classifier(Image.new("RGB", (40, 40), color=(120, 30, 200)))
print("LABEL", result[0]["label"])
"""


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_trust_remote_code_without_flora_hf(tmp_path, kind):
    supernet, subnet, compact = exported(kind)
    compact.save_pretrained(tmp_path / "model")
    x = pixel_values(supernet.model)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(compact(pixel_values=x).logits, tmp_path / "y.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                                           "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("MAXDIFF", "LABEL")))
    assert float(lines["MAXDIFF"]) < 1e-5
    assert lines["LABEL"] in compact.config.id2label.values()


def test_pipeline_in_process(tmp_path):
    from transformers import pipeline

    _, _, compact = exported("deit")
    compact.save_pretrained(tmp_path)
    result = pipeline("image-classification", model=str(tmp_path))(Image.new("RGB", (20, 20)))
    assert result[0]["label"] in compact.config.id2label.values()


def test_remote_code_imports_only_torch_and_transformers():
    source = Path(flora_hf.modeling_flora.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports break trust_remote_code"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "os", "pathlib", "torch", "transformers"}


def test_load_compact_errors(tmp_path):
    dense = make_model("vit")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="holds a 'vit' checkpoint, not a flora-hf compact model"):
        load_compact(tmp_path / "dense")
    _, _, compact = exported("vit")
    compact.save_pretrained(tmp_path / "compact")
    assert type(load_compact(tmp_path / "compact")) is type(compact)
    (tmp_path / "compact" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_compact(tmp_path / "compact")
    (tmp_path / "compact" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_compact(tmp_path / "compact")
