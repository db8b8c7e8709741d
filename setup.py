"""pacs: fused Triton kernels and a thin trainer for RL of LLMs with verifiable rewards.

`pacs_kernels` (the kernels) imports with torch alone; `pacs` (trainer, verifier, CLI) adds the extras below.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# Triton publishes Linux wheels only; CUDA builds of torch already ship a matching triton, and the pin below
# admits it. On a CPU-only Linux machine this brings the interpreter that runs the kernels (TRITON_INTERPRET=1).
CORE_REQUIRES = [
    "torch>=2.4",
    "triton>=3.2; platform_system == 'Linux'",
    "numpy",
    "tqdm",
]

# The math verifier (pacs/verify/): sympy-based parsing of LaTeX answers.
VERIFY_REQUIRES = [
    "sympy>=1.12",
    "latex2sympy2_extended>=1.11,<2",
    "antlr4-python3-runtime==4.13.2",
]

HF_REQUIRES = ["transformers>=4.56", "accelerate", "pyyaml", "matplotlib", "pandas", "pyarrow"]
BENCH_REQUIRES = ["pytest-benchmark", "matplotlib", "psutil", "liger-kernel", "cut-cross-entropy", "math-verify"]
# pacs.integrations.trl (PACSTrainer): tested with these TRL releases (pacs/integrations/trl/compat.py: TESTED_TRL).
TRL_REQUIRES = ["trl>=1.16,<2"] + HF_REQUIRES
DEV_REQUIRES = ["pytest", "pytest-benchmark", "hypothesis", "psutil", "math-verify", "peft"] + TRL_REQUIRES
FLASH_REQUIRES = ["flash-attn>=2.6"]
# pacs.lora (LoRA adapters in `pacs train`): PEFT, optional.
LORA_REQUIRES = ["peft>=0.13"]

setup(
    name="pacs",
    version="0.1.0",
    description="Fused Triton kernels for RLVR of LLMs (PACS, GRPO, RLOO) without vocab-sized logits, and a thin trainer.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pacs_kernels", "pacs_kernels.*", "pacs", "pacs.*"]),
    install_requires=CORE_REQUIRES + VERIFY_REQUIRES,
    extras_require={
        "dev": DEV_REQUIRES,
        "hf": HF_REQUIRES,
        "trl": TRL_REQUIRES,
        "bench": BENCH_REQUIRES,
        "flash": FLASH_REQUIRES,
        "lora": LORA_REQUIRES,
    },
    entry_points={"console_scripts": ["pacs = pacs.cli:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
