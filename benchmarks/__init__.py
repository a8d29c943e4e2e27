"""Scripts that regenerate the README's figures, run from the repository's root as modules:
``python -m benchmarks.demo`` (`make demo`), ``python -m benchmarks.results`` (`make results`) and
``python -m benchmarks.mia_controllers``."""
