"""`saia hpc simulate`: the agent's policy and the baseline over one trace, as a table, a
PNG and (with --json) one JSON line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hpc.simulate.config import ConfigError, load_sim_config
from hpc.simulate.trace import GENERATORS, TraceError
from saia.base.durations import parse_duration


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration such as 90m or 6h") from None


@click.command("simulate")
@click.option(
    "--trace",
    "spec",
    default="poisson",
    show_default=True,
    help=f"{'|'.join(GENERATORS)} or a CSV file (time,service,prompt_tokens,output_tokens)",
)
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="simulator config (YAML: services, queues, instance, ...); default: built in",
)
@click.option("--duration", help="simulated time, e.g. 6h (default: the trace's own)")
@click.option("--seed", type=int, default=1, show_default=True, help="random seed")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write (default: simulate-<trace>.png)",
)
@click.option("--no-plot", is_flag=True, help="write no PNG")
@click.option(
    "--fixed",
    "fixed",
    metavar="PLACEMENT",
    help="pin services to this one of their placements (compare with predicted-start choice)",
)
@click.option("--json", "as_json", is_flag=True, help="end with one JSON line of the figures")
def simulate(
    spec: str,
    config_path: Path | None,
    duration: str | None,
    seed: int,
    plot_path: Path | None,
    no_plot: bool,
    fixed: str | None,
    as_json: bool,
) -> None:
    """Simulate the agent's scaling policy and the baseline over a request trace.

    The agent's real decide() runs in simulated time against a modelled Slurm queue
    (start waits, model load time, throughput, time limits, preemptions).
    """
    from hpc.simulate.plot import PlotUnavailable, plot
    from hpc.simulate.report import as_json as json_line
    from hpc.simulate.report import summarize, table
    from hpc.simulate.run import compare, load_trace, trace_duration

    try:
        config = load_sim_config(config_path)
        config = config.fixed(fixed) if fixed is not None else config
        trace = load_trace(spec, config, _duration(duration), seed)
    except (ConfigError, TraceError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    length = trace_duration(spec, trace, _duration(duration))
    runs = compare(config, trace, seed, length)
    summaries = [summarize(run) for run in runs]
    name = spec if spec in GENERATORS else Path(spec).stem
    click.echo(table(summaries, name))
    if not no_plot:
        target = plot_path or Path(f"simulate-{name}.png")
        try:
            plot(runs, target, f"{name}: {len(trace)} requests over {length / 3600:.1f} h")
        except (PlotUnavailable, OSError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        click.echo(f"plot: {target}")
    if as_json:
        click.echo(json_line(summaries, trace=name, seed=seed, duration_s=length, fixed=fixed))
