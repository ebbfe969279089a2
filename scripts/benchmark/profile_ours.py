"""Run the ``imagingstudy-scp`` command line under cProfile, on every thread; used by ``bench.py --profile``.

    python scripts/benchmark/profile_ours.py OUT.prof serve --host ... (the usual imagingstudy-scp arguments)

The entry point is found through the installed package's console script (the server is not imported by
name), every thread started afterwards gets its own profiler (``threading.setprofile``), and when the command
returns (SIGTERM stops ``serve``) all profiles are merged into ``OUT.prof`` and the top functions by own time
and by cumulative time are written to ``OUT.prof.txt``. Profiling slows the server down (often by half or
more): use it to see where time goes, not for figures.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
from importlib.metadata import entry_points

_profiles: list[cProfile.Profile] = []


def _start_thread_profiler(*_args: object) -> None:
    """First profile event of a new thread: hand the thread over to its own cProfile profiler."""
    sys.setprofile(None)
    profile = cProfile.Profile()
    _profiles.append(profile)
    profile.enable()


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    (entry,) = entry_points(group="console_scripts", name="imagingstudy-scp")
    command = entry.load()
    threading.setprofile(_start_thread_profiler)
    profile = cProfile.Profile()
    _profiles.append(profile)
    profile.enable()
    try:
        return int(command(argv) or 0)
    finally:
        profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        stats = pstats.Stats(*_profiles)
        stats.dump_stats(out)
        text = io.StringIO()
        stats.stream = text  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        with open(out + ".txt", "w") as handle:
            handle.write(text.getvalue())


if __name__ == "__main__":
    sys.exit(main())
