"""TensorBoard scalars of a training run under Megatron-LM's names, so that dashboards and habits
built on Megatron's ``--tensorboard-dir`` carry over.

The names are those of megatron/training/training.py (training_log, evaluate_and_print_results):
``lm loss``, ``learning-rate``, ``batch-size``, ``iteration-time`` (seconds), ``throughput`` (model
TFLOP/s per GPU, Megatron's count), ``mem-max-allocated-bytes``, and ``lm loss validation``; each
loss and the learning rate also ``... vs samples``. Written through torch.utils.tensorboard.
"""
from torch.utils.tensorboard import SummaryWriter

# run-log record key -> Megatron-LM's scalar name
TRAINING_SCALARS = {
    "loss": "lm loss",
    "lr": "learning-rate",
    "seconds": "iteration-time",
    "tflops_per_gpu": "throughput",
    "peak_memory_bytes": "mem-max-allocated-bytes",
}
VALIDATION_SCALARS = {"valid_loss": "lm loss validation"}
VS_SAMPLES = ("lm loss", "learning-rate", "lm loss validation")


class TensorBoardLog:
    """Writes run-log records (the example's JSON-lines entries) as scalars: training records every
    ``interval`` iterations, as Megatron's --tensorboard-log-interval, validation records always."""

    def __init__(self, log_dir, interval, global_batch_size):
        self.writer = SummaryWriter(log_dir=log_dir)
        self.interval = interval
        self.global_batch_size = global_batch_size

    def record(self, entry):
        iteration = entry["iteration"]
        is_validation = any(key in entry for key in VALIDATION_SCALARS)
        if not is_validation and iteration % self.interval:
            return
        names = {**TRAINING_SCALARS, **VALIDATION_SCALARS}
        samples = iteration * self.global_batch_size
        for key, value in entry.items():
            name = names.get(key)
            if name is None:
                continue
            self.writer.add_scalar(name, value, iteration)
            if name in VS_SAMPLES:
                self.writer.add_scalar(f"{name} vs samples", value, samples)
        if not is_validation:
            self.writer.add_scalar("batch-size", self.global_batch_size, iteration)
        # Flushed per record, as the JSON-lines log: a run watched live (or killed) shows every step.
        self.writer.flush()

    def close(self):
        self.writer.close()
