import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_model

from flora_hf import FloraSupernetForImageClassification
from flora_hf.trainer import (
    TEACHER_LOGITS_FILE,
    FloraTrainer,
    FloraTrainingArguments,
    distillation_loss,
    subnet_for_step,
)

SCRIPT = Path(__file__).parent / "scripts" / "train_supernet_tiny.py"


def run_script(*args, launcher=()):
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


def test_distributed_processes_train_the_same_subnets(tmp_path):
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", "29517")
    run_script(SCRIPT, tmp_path, 4, launcher=launcher)
    rank0 = json.loads((tmp_path / "subnets-rank0.json").read_text())
    rank1 = json.loads((tmp_path / "subnets-rank1.json").read_text())
    assert len(rank0) == 4 and rank0 == rank1
    assert len({json.dumps(s, sort_keys=True) for _, s in rank0}) > 1, "different steps train different subnets"
    weights0, weights1 = (load_file(tmp_path / f"weights-rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)


def test_resume_continues_subnet_sequence_and_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_script(sys.executable, SCRIPT, full, 6)
    run_script(sys.executable, SCRIPT, killed, 6, "--stop-after", 2)
    shutil.rmtree(killed / "checkpoint-4", ignore_errors=True)  # the kill came right after checkpoint-2
    first = json.loads((killed / "subnets-rank0.json").read_text())
    run_script(sys.executable, SCRIPT, killed, 6, "--resume")
    resumed = json.loads((killed / "subnets-rank0.json").read_text())
    uninterrupted = json.loads((full / "subnets-rank0.json").read_text())
    assert first + resumed == uninterrupted
    a, b = load_file(full / "weights-rank0.safetensors"), load_file(killed / "weights-rank0.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_gradient_accumulation_keeps_the_step_subnet(tmp_path):
    run_script(sys.executable, SCRIPT, tmp_path, 3, "--accumulate", 2)
    trained = json.loads((tmp_path / "subnets-rank0.json").read_text())
    assert [step for step, _ in trained] == [0, 0, 1, 1, 2, 2]
    assert trained[0][1] == trained[1][1] and trained[2][1] == trained[3][1]


def test_low_rank_aware_sampling_prefers_small_ranks():
    space = FloraSupernetForImageClassification.from_dense(make_model("vit")).space
    group = space.group_names[0]
    aware = Counter(subnet_for_step(space, 0, step, True)[group] for step in range(3000))
    uniform = Counter(subnet_for_step(space, 0, step, False)[group] for step in range(3000))
    assert aware[0.125] > 3 * aware[1.0]
    assert abs(uniform[0.125] - uniform[1.0]) < 150
    assert subnet_for_step(space, 7, 11, True) == subnet_for_step(space, 7, 11, True)


def test_distillation_loss_is_temperature_scaled_kl():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    expected = sum(
        (torch.softmax(teacher[i] / 2, -1) * (torch.log_softmax(teacher[i] / 2, -1) - torch.log_softmax(student[i] / 2, -1))).sum()
        for i in range(4)
    ) / 4 * 4
    torch.testing.assert_close(distillation_loss(student, teacher, 2.0), expected)
    assert distillation_loss(teacher, teacher, 1.0).abs() < 1e-6


def tiny_trainer(tmp_path, **overrides):
    dense = make_model("vit")
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 5} for i in range(40)]
    args = FloraTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[],
                                  use_cpu=True, save_strategy="no", disable_tqdm=True, **overrides)
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    return FloraTrainer(model=supernet, args=args, teacher=dense, train_dataset=data, eval_dataset=data[:16])


def test_evaluation_reports_smallest_and_largest_subnet(tmp_path):
    trainer = tiny_trainer(tmp_path, eval_subnets="min,max,uniform:0.5")
    metrics = trainer.evaluate()
    for name in ("min", "max", "uniform_0.5"):
        assert 0.0 <= metrics[f"eval_{name}_accuracy"] <= 1.0
    assert trainer.model.active_subnet == trainer.model.space.max_subnet()  # restored


def test_teacher_logits_cached_and_validated(tmp_path):
    trainer = tiny_trainer(tmp_path)
    path = tmp_path / TEACHER_LOGITS_FILE
    cached = load_file(path)["logits"]
    assert cached.shape == (40, 5)
    torch.testing.assert_close(trainer.teacher_logits, cached)
    stale = tmp_path / "stale"
    stale.mkdir()
    from safetensors.torch import save_file
    save_file({"logits": torch.zeros(40, 5)}, str(stale / TEACHER_LOGITS_FILE))
    trainer = tiny_trainer(stale)
    assert not torch.equal(trainer.teacher_logits, torch.zeros(40, 5)), "a foreign cache file must not be trusted"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="distillation_alpha"):
        FloraTrainingArguments(output_dir="x", distillation_alpha=1.5, report_to=[])
    with pytest.raises(TypeError, match="FloraSupernetForImageClassification"):
        FloraTrainer(model=make_model("vit"), args=FloraTrainingArguments(output_dir="x", report_to=[]))
