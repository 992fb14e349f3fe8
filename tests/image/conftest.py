"""Phase timings of the image test, printed at the end of the run (``make image-test`` and
``make test`` alike), so a slow phase shows where CI's time goes."""

import contextlib
import time
from collections.abc import Iterator

PHASES: list[tuple[str, float]] = []
FINDINGS: list[str] = []
"""What the boot showed (exposure scores, unit states), printed with the timings."""


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        PHASES.append((name, time.monotonic() - started))


def pytest_terminal_summary(terminalreporter) -> None:
    if not PHASES and not FINDINGS:
        return
    terminalreporter.section("image test: phases")
    for name, seconds in PHASES:
        terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
    terminalreporter.write_line(f"{sum(s for _, s in PHASES):8.1f} s  in all")
    if FINDINGS:
        terminalreporter.section("image test: what the booted system showed")
        for line in FINDINGS:
            terminalreporter.write_line(line)
