"""Silences the library notices every seqpipe_ds start printed, and nothing else.

Without it, ``seqpipe-bench --help`` printed five warnings before its usage: four of megatron-core's
"Transformer Engine and Apex are not installed" UserWarnings (it falls back to torch
implementations, which is what seqpipe_ds uses anyway) and DeepSpeed's "Setting accelerator to CPU"
log line (on a machine without GPU, the expected outcome). Each is matched by its message and
source, so any other warning, from these libraries too, still shows.

It works by being imported before deepspeed and megatron.core: the filters must be in place when
those modules are first imported. Importing it twice adds nothing twice.
"""
import logging
import warnings

# megatron-core's fallbacks when Transformer Engine / Apex are missing (optimizer, clip_grads,
# megatron_fsdp's mixed precision). warnings.filterwarnings matches `message` at the start.
MEGATRON_FALLBACK = r"Transformer Engine and Apex are not installed\. Falling back to "
# DeepSpeed's accelerator auto-detection falling back to CPU (deepspeed/accelerator/real_accelerator.py).
DEEPSPEED_CPU_FALLBACK = ("Setting accelerator to CPU. If you have GPU or other accelerator, "
                          "we were unable to detect it.")
DEEPSPEED_LOGGER = "DeepSpeed"


class _DropMessage(logging.Filter):
    """Drops records whose message is exactly one known text."""

    def __init__(self, message):
        super().__init__()
        self.message = message

    def filter(self, record):
        return record.getMessage() != self.message


def install():
    """Installs the filters once (a repeated call finds them in place)."""
    warnings.filterwarnings("ignore", message=MEGATRON_FALLBACK, category=UserWarning, module=r"megatron\.core\.")
    # filterwarnings moves an identical filter to the front rather than adding a copy.
    logger = logging.getLogger(DEEPSPEED_LOGGER)  # the logger DeepSpeed's LoggerFactory creates by this name
    if not any(isinstance(f, _DropMessage) and f.message == DEEPSPEED_CPU_FALLBACK for f in logger.filters):
        logger.addFilter(_DropMessage(DEEPSPEED_CPU_FALLBACK))


install()
