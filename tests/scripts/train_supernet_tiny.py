"""Trains a tiny supernet on synthetic data and dumps, per process, the subnets it trained and its final weights.

Run directly or under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) by the trainer tests.
usage: train_supernet_tiny.py OUTPUT_DIR MAX_STEPS [--resume] [--stop-after N] [--accumulate K]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_model  # noqa: E402

from flora_hf import FloraSupernetForImageClassification  # noqa: E402
from flora_hf.trainer import FloraTrainer, FloraTrainingArguments  # noqa: E402


class Stop(TrainerCallback):
    """Simulates a kill right after step N (and its checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def synthetic(n=96, size=16, classes=5):
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, size, size, generator=generator), "labels": i % classes} for i in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--accumulate", type=int, default=1)
    options = parser.parse_args()
    dense = make_model("vit")
    supernet = FloraSupernetForImageClassification.from_dense(dense)
    args = FloraTrainingArguments(
        output_dir=options.output_dir, max_steps=options.max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=options.accumulate, learning_rate=1e-3, save_strategy="steps", save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=3, disable_tqdm=True, eval_strategy="no",
    )
    trainer = FloraTrainer(model=supernet, args=args, teacher=dense, train_dataset=synthetic(),
                           callbacks=[Stop(options.stop_after)] if options.stop_after else None)
    trained = []
    step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)
        assert supernet.active_subnet == trainer.current_subnet
        trained.append([trainer.state.global_step, trainer.current_subnet])
        return loss

    trainer.training_step = recording_step
    trainer.train(resume_from_checkpoint=options.resume or None)
    rank = trainer.args.process_index
    out = Path(options.output_dir)
    (out / f"subnets-rank{rank}.json").write_text(json.dumps(trained))
    state = {k: v.contiguous() for k, v in supernet.state_dict().items()}
    save_file(state, str(out / f"weights-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
