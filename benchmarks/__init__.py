"""Speed comparisons of resfused against eager PyTorch and torch.compile (`make bench`).

    python -m benchmarks                 # CPU (or CUDA when present), fp32, 2 threads
    python -m benchmarks --dtype fp32 bf16 --compile
    resfused-bench --quick --out /tmp/b  # a smoke run

`common` holds the configs, results, timing and output helpers; `cpu` the CPU benchmark;
`gpu` (when present) the CUDA one.
"""
