"""Request traces: Poisson, diurnal and bursty generators, and a CSV format.

CSV: a header line `time,service,prompt_tokens,output_tokens`, then one request per line;
`time` in seconds from the start of the trace (any order), an empty service means the
first simulated one. Generators are seeded: the same seed gives the same trace.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CSV_FIELDS = ("time", "service", "prompt_tokens", "output_tokens")
GENERATORS = ("poisson", "diurnal", "bursty")
# The length each generator runs when no --duration is given.
DEFAULT_DURATION = {"poisson": 4 * 3600.0, "diurnal": 24 * 3600.0, "bursty": 6 * 3600.0}
DAY = 86400.0


class TraceError(ValueError):
    """A trace that cannot be read; str() is one line."""


@dataclass(frozen=True)
class Request:
    at: float
    service: str
    prompt_tokens: int
    output_tokens: int


def _tokens(rng: random.Random, median: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), 0.6))))


def _thinned(
    rng: random.Random, rate: Callable[[float], float], peak: float, duration: float
) -> Iterator[float]:
    """Arrival times of a Poisson process with a time-varying rate (Lewis-Shedler thinning)."""
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return
        if rng.random() * peak < rate(t):
            yield t


def _requests(rng: random.Random, times: Iterator[float], service: str) -> list[Request]:
    return [Request(t, service, _tokens(rng, 600, 8000), _tokens(rng, 250, 2000)) for t in times]


def poisson(service: str, duration: float, seed: int, rate: float = 1.5) -> list[Request]:
    """A steady load: `rate` requests/s on average."""
    rng = random.Random(f"poisson:{seed}")
    return _requests(rng, _thinned(rng, lambda _t: rate, rate, duration), service)


def diurnal(service: str, duration: float, seed: int, peak: float = 3.0) -> list[Request]:
    """A working day: near nothing at midnight, `peak` requests/s at noon."""
    rng = random.Random(f"diurnal:{seed}")

    def rate(t: float) -> float:
        return peak * max(0.02, 0.5 - 0.5 * math.cos(2 * math.pi * t / DAY))

    return _requests(rng, _thinned(rng, rate, peak, duration), service)


def bursty(
    service: str, duration: float, seed: int, base: float = 0.3, burst: float = 5.0
) -> list[Request]:
    """A low base load with bursts of `burst` more requests/s lasting 2-6 minutes, about
    one every 40 minutes (a class starting an exercise, a batch script)."""
    rng = random.Random(f"bursty:{seed}")
    bursts: list[tuple[float, float]] = []
    t = rng.expovariate(1 / 1200)
    while t < duration:
        length = rng.uniform(120, 360)
        bursts.append((t, t + length))
        t += length + rng.expovariate(1 / 2400)

    def rate(at: float) -> float:
        return base + (burst if any(a <= at < b for a, b in bursts) else 0.0)

    return _requests(rng, _thinned(rng, rate, base + burst, duration), service)


def generate(kind: str, service: str, duration: float | None, seed: int) -> list[Request]:
    length = duration if duration is not None else DEFAULT_DURATION[kind]
    return {"poisson": poisson, "diurnal": diurnal, "bursty": bursty}[kind](service, length, seed)


def read_csv(path: Path, default_service: str) -> list[Request]:
    """A trace file, sorted by time; TraceError names the first bad line."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return sorted(_parse_rows(csv.reader(handle), path, default_service), key=_at)
    except OSError as error:
        raise TraceError(f"{path}: cannot read: {error.strerror or error}") from None


def _at(request: Request) -> float:
    return request.at


def _parse_rows(rows: Iterator[list[str]], path: Path, default_service: str) -> list[Request]:
    header = next(rows, None)
    if header is None or tuple(h.strip() for h in header) != CSV_FIELDS:
        raise TraceError(f"{path}: line 1: expected the header {','.join(CSV_FIELDS)}")
    requests = []
    for number, row in enumerate(rows, 2):
        if not row or not "".join(row).strip():
            continue
        try:
            time_text, service, prompt, output = (field.strip() for field in row)
            request = Request(
                float(time_text), service or default_service, int(prompt), int(output)
            )
        except ValueError:
            raise TraceError(f"{path}: line {number}: expected {','.join(CSV_FIELDS)}") from None
        if not 0 <= request.at < math.inf or request.prompt_tokens < 0 or request.output_tokens < 1:
            raise TraceError(f"{path}: line {number}: negative time or no tokens")
        requests.append(request)
    return requests


def write_csv(path: Path, requests: list[Request]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for r in requests:
            writer.writerow((f"{r.at:.3f}", r.service, r.prompt_tokens, r.output_tokens))
