"""Where `edge-safe bench` ran (machine facts) and what a process serving one variant peaks at in memory.

Peak RSS is measured in a fresh child process per variant (load, one request,
read the peak): one process's peak cannot be split between variants, and the
bench process itself holds two models. The child reads ``VmHWM`` from
``/proc/self/status`` (the peak of its own address space; ``ru_maxrss`` may
carry the parent's peak across fork + exec on Linux), else ``ru_maxrss``.
The child is ``python -c`` running :func:`child_main` with the variant as JSON.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RSS_TIMEOUT_S = 300
#: What the child process runs: one variant, given as JSON in argv[1] (see child_main).
CHILD = "from edge_safe.bench.env import child_main; child_main()"


# --- machine ----------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU, cores, memory, OS, Python and library versions, load average and git commit."""
    import llama_cpp
    import numpy as np

    from edge_safe import __version__
    from edge_safe.llama import amx_in_build, resolve_cpu_repack

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "memory_bytes": _proc_kb("/proc/meminfo", "MemTotal"), "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__, "numpy": np.__version__, "edge_safe": __version__,
        "load_average": load_average(), "git_commit": _git_commit(),
        "llama_cpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "amx_build": amx_in_build(), "cpu_repack": resolve_cpu_repack(),  # every system loads with this
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _proc_kb(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file, in bytes (None where /proc or the field is missing)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 min load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --- peak RSS per variant ----------------------------------------------------------------------


def measure_peak_rss(spec: dict) -> dict:
    """Run one variant in a fresh Python process; returns its peak and post-load RSS in bytes
    (``{"error": ...}`` when the child fails)."""
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)],
                             capture_output=True, text=True, timeout=RSS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {RSS_TIMEOUT_S} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def _child(spec: dict) -> dict:
    """Load the variant's system, serve one request, report memory (runs in the child)."""
    t0 = time.perf_counter()
    kw = {"n_ctx": spec["n_ctx"], "n_threads": spec["n_threads"], "n_gpu_layers": spec["n_gpu_layers"]}
    if spec["system"] == "edge-safe":
        from edge_safe.runtime import EdgeSafe

        es = EdgeSafe(spec["model"], spec["bank"], **kw)
        loaded = _rss("VmRSS")
        "".join(es.submit(spec["question"], tokens=spec["tokens"], mode=spec["mode"], max_tokens=spec["max_tokens"]))
        extra = {"snapshot_bytes": es.prefix_cache.nbytes}
    else:
        from edge_safe.llama import plain_llama

        llm = plain_llama(spec["model"], n_batch=spec["n_batch"], n_threads_batch=spec["n_threads"],
                              verbose=False, **kw)
        loaded = _rss("VmRSS")
        for text, n in spec["calls"]:
            llm.reset()
            llm.create_completion(text, max_tokens=n, temperature=0.0)
        extra = {}
    return {"peak_rss_bytes": _rss("VmHWM"), "rss_after_load_bytes": loaded,
            "seconds": round(time.perf_counter() - t0, 2), **extra}


def _rss(field: str) -> int | None:
    """VmHWM (peak) or VmRSS (now) of this process in bytes; ru_maxrss when /proc is missing."""
    found = _proc_kb("/proc/self/status", field)
    if found is not None or field != "VmHWM":
        return found
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child_main() -> None:
    """The child's entry: the variant from argv[1], its memory figures as one JSON line on stdout."""
    print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
