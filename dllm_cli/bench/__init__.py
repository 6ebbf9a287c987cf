"""``dllm bench``: a diffusion-aware benchmark with side-by-side baselines and the machine's limit.

``run_benchmark(models, BenchConfig(...))`` returns one JSON document; ``report`` renders and compares them;
``synthetic.build_synthetic`` makes random-weight GGUFs with the real LLaDA2 shapes.
"""
from dllm_cli.bench.measure import BenchConfig, run_benchmark

__all__ = ["BenchConfig", "run_benchmark"]
