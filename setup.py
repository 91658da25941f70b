"""seqpipe_ds: token-level (TeraPipe) pipeline parallelism for Megatron GPT training in DeepSpeed."""
from setuptools import setup

# torch is pinned to the CPU build available on the reference machine; on a GPU cluster install
# the package into an environment that already has a CUDA torch (pip keeps the installed torch
# when it satisfies the range below).
INSTALL_REQUIRES = [
    "torch>=2.4,<=2.14.1",
    "deepspeed==0.19.8",
    "megatron-core>=0.16.1",
    "numpy",
    "scipy",
    "tqdm",
    "matplotlib",
    "pydantic>=2",
    # seqpipe-data's encoders (GPT-2 BPE from vocab.json/merges.txt, any tokenizer.json); Rust, no hub access
    "tokenizers>=0.15",
    # torch.utils.tensorboard writes the event files; it needs this package's protobufs
    "tensorboard",
]

setup(
    name="seqpipe_ds",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=["seqpipe_ds", "seqpipe_ds.attention", "seqpipe_ds.model", "seqpipe_ds.planner", "seqpipe_ds.schedules",
              "seqpipe_ds.cli",
              "seqpipe_ds.data", "seqpipe_ds.patches"],
    package_dir={"seqpipe_ds.patches": "patches"},
    package_data={"seqpipe_ds.data": ["corpus/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-timeout"]},
    entry_points={
        "console_scripts": [
            "seqpipe-plan=seqpipe_ds.cli.plan:main",
            "seqpipe-bench=seqpipe_ds.cli.bench:main",
            "seqpipe-data=seqpipe_ds.cli.data:main",
            "seqpipe-compare=seqpipe_ds.cli.compare:main",
        ]
    },
)
