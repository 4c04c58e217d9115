"""Evaluation of token banks through the llama.cpp runtime (`edge-safe eval`).

``evaluate`` decides what is measured, ``data`` builds the cases, ``systems`` runs the
baselines, ``metrics`` judges replies, ``curve`` reads the operating curve, ``sam`` the
Safety Alignment Margin, ``report`` and ``markdown`` write the report, ``reporting`` the
files and plots (shared with bench); ``compare`` and ``refusal_wording`` are side
measurements. The committed report of the shipped bank is in ``eval/results/``. The
runtime never imports this package.
"""
