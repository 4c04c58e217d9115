"""Latency and memory benchmarks of the runtime (`edge-safe bench`).

``benchmark`` orders and repeats the measurements, ``systems`` holds what is measured
(edge-safe, bare llama.cpp, text rules, a guard pattern), ``env`` the machine facts,
``report`` and ``plots`` the outputs. The committed report is in ``bench/results/``.
The runtime never imports this package.
"""
