"""Neuron reports: HTML pages (Neuroscope-style), JSON documents, Markdown, Neuronpedia-style
batches, and a static site for whole hooks.

Every format is rendered from the document of :mod:`queries.pages`. HTML pages embed that
document as JSON (with ``<``, ``>`` and ``&`` escaped, so corpus text cannot close the script
block) and draw themselves with a small inline script that only ever writes text nodes. Pages
need no network: styles and scripts are inline.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
from jinja2 import Environment, PackageLoader, select_autoescape

from actscope.queries import neuronpedia
from actscope.queries.neuron_record import neuron_record
from actscope.queries.pages import HookPages, finite
from actscope.queries.text import visible
from actscope.storage.errors import OutputError, QueryError
from actscope.storage.spec import model_title

if TYPE_CHECKING:
    from actscope.queries.catalog import Catalog

FORMATS = ("html", "json", "md", "neuronpedia", "neuron-record")
EXPORT_FORMATS = ("html", "json", "neuronpedia", "neuron-record")


@cache
def _env() -> Environment:
    return Environment(loader=PackageLoader("actscope.queries", "templates"), autoescape=select_autoescape(["html"]))


@cache
def _asset(name: str) -> str:
    return _env().loader.get_source(_env(), name)[0]


def script_json(value) -> str:
    """JSON safe to place inside ``<script type="application/json">`` (marked safe for Jinja)."""
    from markupsafe import Markup

    text = orjson.dumps(value).decode()
    # (str.replace, not str.translate: ten times faster on a page's worth of JSON)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(doc: dict, site: dict | None = None) -> str:
    """A neuron page. ``site`` (``{"hooks": [...]}``) turns on navigation and partner links."""
    return _env().get_template("neuron.html").render(
        doc=doc, data=script_json(doc), site=script_json(site), css=_asset("actscope.css"), js=_script("neuron.js")
    )


def _script(name: str):
    from markupsafe import Markup

    return Markup(_asset(name))


def render_json(doc: dict, *, indent: bool = True) -> str:
    """JSON text (UTF-8, no NaN: documents hold null there); indented for a single report, compact
    for bulk exports."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else 0).decode() + "\n"


# -- Markdown --------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def md_text(text: str) -> str:
    """Corpus text inside Markdown: special characters backslash-escaped, HTML neutralised
    (renderers pass raw HTML through), newlines and control characters made visible."""
    text = visible(text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    return _MD_SPECIAL.sub(r"\\\1", text)


def _num(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def render_markdown(doc: dict, window: int = 12) -> str:
    s = doc["stats"]
    lines = [
        f"# {md_text(doc['hook'])} · neuron {doc['neuron']}",
        "",
        f"{md_text(doc['model'])} ({doc['architecture']}), {s['count']:,} tokens; per-token activations {doc['activation_source']}.",
        "",
        "| max | min | mean | std | density | skew | kurtosis | p50 | p90 | p99 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| " + " | ".join(_num(s[k]) for k in ("max", "min", "mean", "std", "frac_active", "skew", "kurtosis", "p50", "p90", "p99")) + " |",
    ]

    def examples(title: str, records: list[dict], label) -> None:
        if not records:
            return
        lines.extend(["", f"## {title}", ""])
        for ex in records:
            seq = doc["sequences"][str(ex["seq_id"])]
            pos = ex["pos"] - seq["start"]
            a, b = max(0, pos - window), min(len(seq["tokens"]), pos + window + 1)
            before = md_text("".join(seq["tokens"][a:pos]))
            after = md_text("".join(seq["tokens"][pos + 1 : b]))
            mark = md_text(seq["tokens"][pos]) or "∅"
            lines.append(f"- **{ex['activation']:.4g}** ({label(ex)}, seq {ex['seq_id']}, pos {ex['pos']}): {before}**⟦{mark}⟧**{after}")

    examples("Top examples", doc["top_examples"], lambda ex: f"top {ex['rank']}")
    examples("Bottom examples", doc["bottom_examples"], lambda ex: f"bottom {ex['rank']}")
    examples("Samples by activation band", doc["band_samples"], lambda ex: f"band {ex['band']}: {_num(ex['lo'])} to {_num(ex['hi'])}")
    if doc["top_tokens"]:
        lines.extend(["", "## Top tokens by mean activation", "", "| rank | token | mean | count |", "| ---: | --- | ---: | ---: |"])
        lines += [f"| {t['rank']} | {md_text(t['token'])} | {t['mean_activation']:.4g} | {t['count']} |" for t in doc["top_tokens"]]
    for direction in ("promote", "suppress"):
        if doc["logit_effects"][direction]:
            lines.extend(["", f"## Logit effects: {direction}d tokens", "", "| rank | token | effect |", "| ---: | --- | ---: |"])
            lines += [f"| {t['rank']} | {md_text(t['token'])} | {t['effect']:.4g} |" for t in doc["logit_effects"][direction]]
    for ranking, title in (("pearson", "by |correlation|"), ("jaccard", "by Jaccard")):
        partners = doc["coactivation"][ranking]
        if partners:
            lines.extend(["", f"## Co-activation partners {title}", "", "| rank | hook | neuron | pearson | jaccard | P(b\\|a) | lift | both |",
                          "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"])
            lines += [f"| {p['rank']} | {md_text(p['hook'])} | {p['neuron']} | {_num(p['pearson'])} | {_num(p['jaccard'])} | "
                      f"{_num(p['p_b_given_a'])} | {_num(p['lift'])} | {p['n_both']} |" for p in partners]
    lines.extend(["", "## Reproduce", "", "```python", doc["snippet"].rstrip(), "```", "", MARKDOWN_SIGNATURE])
    return "\n".join(lines)


# -- one report ------------------------------------------------------------------------------

def report_format(out: str, requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            raise QueryError(f"format must be one of {', '.join(FORMATS)}; got {requested!r}.")
        return requested
    suffix = Path(out).suffix.lower().lstrip(".")
    formats = {"html": "html", "htm": "html", "json": "json", "md": "md", "markdown": "md"}
    if suffix not in formats:
        raise QueryError(f"cannot tell the format from {out!r}: name the file .html, .json or .md, or pass --format.")
    return formats[suffix]


@dataclass(frozen=True)
class NeuronPage:
    """A neuron's page for notebooks: ``document`` (the JSON document), ``html()`` (the page),
    ``markdown()``; Jupyter shows the page inline, in a sandboxed frame (its scripts run there,
    with no access to the notebook)."""

    document: dict

    def html(self) -> str:
        return render_html(self.document)

    def markdown(self) -> str:
        return render_markdown(self.document)

    def _repr_html_(self) -> str:
        title = html.escape(f"{self.document['hook']} neuron {self.document['neuron']}")
        page = html.escape(self.html(), quote=True)
        return (f'<iframe title="{title}" srcdoc="{page}" sandbox="allow-scripts" '
                'style="width: 100%; height: 640px; border: 1px solid #ddd"></iframe>')

    def __repr__(self) -> str:
        stats = self.document["stats"]
        return f"NeuronPage({self.document['hook']} neuron {self.document['neuron']}: max {stats['max']}, mean {stats['mean']})"


def render(doc: dict, fmt: str, n_layers: int = 0) -> str:
    if fmt == "html":
        return render_html(doc)
    if fmt == "md":
        return render_markdown(doc)
    if fmt == "neuron-record":
        return render_json(neuron_record(doc, n_layers))
    return render_json(doc)


def write_report(catalog: Catalog, hook: str, neuron: int, out: str, fmt: str | None = None, *, k: int = 20,
                 overwrite: bool = False) -> str:
    """Write a neuron's report to the file ``out``: a new file, an earlier actscope report (an
    HTML or Markdown one, which says so), or with ``overwrite`` any file."""
    check_output_file(out, overwrite=overwrite)
    fmt = report_format(out, fmt)
    doc = HookPages(catalog, hook, [neuron], k=k).document(neuron)
    if fmt == "neuronpedia":  # a batch of one feature, as the export writes 128
        _write_file(Path(out), render_json(neuronpedia.batch([doc], neuronpedia.batch_meta(catalog, hook))))
    else:
        _write_file(Path(out), render(doc, fmt, int(catalog.model.n_layers)))
    return fmt


#: Written into every exported folder: only a folder holding it may receive another export.
EXPORT_MARKER = ".actscope-export"


#: The last line of a Markdown report (an HTML one names actscope in its generator meta tag):
#: what lets a report be written again over its earlier self without --overwrite.
MARKDOWN_SIGNATURE = "<!-- written by actscope -->"


def check_output_file(out: str, *, overwrite: bool = False) -> None:
    """Refuse a report path that is a folder, lies under a file, or lies inside a store; and an
    existing file unless it is an earlier actscope report, or ``overwrite`` says so."""
    path = Path(out)
    if path.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name (e.g. {path / 'neuron.html'}).")
    _refuse_inside_store(path, out)
    parent = _existing_parent(path)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"--out {out}: {parent} is a file, not a folder.")
    earlier = path.is_file() and not path.is_symlink() and _earlier_report(path)
    if (path.exists() or path.is_symlink()) and not overwrite and not earlier:
        raise OutputError(f"--out {out} exists and is not an earlier actscope report; pass --overwrite to replace it, or give a new file name.")


def _earlier_report(path: Path) -> bool:
    """Whether ``path`` is a report actscope wrote (HTML or Markdown: JSON formats are other
    tools' schemas, with no room to say so)."""
    with path.open("rb") as f:
        head = f.read(4096)
        f.seek(max(path.stat().st_size - 64, 0))
        tail = f.read()
    return b'<meta name="generator" content="actscope">' in head or tail.rstrip().endswith(MARKDOWN_SIGNATURE.encode())


def check_output_folder(out: str, *, overwrite: bool) -> None:
    """An export goes into a new or empty folder, or (with ``overwrite``) one that holds an
    earlier export; never into a store, and never over other files."""
    root = Path(out)
    _refuse_inside_store(root, out)
    if root.exists() and not root.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder.")
    parent = _existing_parent(root)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"--out {out}: {parent} is a file, not a folder.")
    if not root.is_dir() or not any(root.iterdir()):
        return
    marker = root / EXPORT_MARKER
    if not marker.is_file() or marker.is_symlink():
        raise OutputError(f"--out {out} is a folder that is not empty and holds no actscope export; give a new or empty folder.")
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                link = os.path.join(folder, name)
                raise OutputError(f"--out {out}: {link} is a symbolic link (to {os.readlink(link)}); an export never writes through one. Remove it, or give a new folder.")
    if not overwrite and _marker(root).get("complete", True):
        raise OutputError(f"--out {out} holds an earlier export; pass --overwrite to replace its pages, or give a new folder.")


def _marker(root: Path) -> dict:
    try:
        found = json.loads((root / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _remove_stale_pages(root: Path, written: set[Path]) -> int:
    """Remove the pages and batches of an earlier export that this one did not write (another
    store's neurons, another format's files): only ``.html`` and ``.json`` files, never through a
    link (``check_output_folder`` refused any), then the folders left empty. How many removed."""
    removed = 0
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if path.suffix in (".html", ".json") and path not in written and not path.is_symlink():
                path.unlink()
                removed += 1
        if Path(folder) != root and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
    return removed


def _existing_parent(path: Path) -> Path | None:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return None


def _refuse_inside_store(path: Path, out: str) -> None:
    """A store is actscope's to write: a report there would replace its files."""
    real = Path(os.path.realpath(path))
    for folder in [real, *real.parents]:
        if (folder / "zarr.json").is_file():
            raise OutputError(f"--out {out} is inside a Zarr store ({folder}); write reports somewhere else.")


# -- a static site ---------------------------------------------------------------------------

def export(catalog: Catalog, out: str, hooks: list[str] | None = None, *, fmt: str = "html", k: int = 20, progress=None,
           overwrite: bool = False) -> dict:
    """Write a static site (``fmt="html"``), one JSON document per neuron (``json``), Neuronpedia
    batches (``neuronpedia``) or one neuron-explainer ``NeuronRecord`` per neuron
    (``neuron-record``) for ``hooks`` (default: all) under ``out``: a new or empty folder, or with
    ``overwrite`` one holding an earlier export. Returns what was written and how long each step
    took."""
    if fmt not in EXPORT_FORMATS:
        raise QueryError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}.")
    widths = catalog.model.hook_widths
    hooks = list(hooks or widths)
    for hook in hooks:
        if hook not in widths:
            raise QueryError(f"{hook} was not recorded in this store; recorded hooks: {', '.join(widths)}.")
    check_output_folder(out, overwrite=overwrite)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    marker = {"store": catalog.store.url, "format": fmt, "hooks": hooks}
    # Marked unfinished first (so the folder is known as an export's), finished last.
    _write_file(root / EXPORT_MARKER, json.dumps({**marker, "complete": False}) + "\n")
    site = {"hooks": hooks}
    summary = {"hooks": {}, "files": 0, "bytes": 0}
    paths: set[Path] = set()  # what this export wrote

    def write(path: Path, text: str) -> int:
        paths.add(path)
        return _write_file(path, text)
    for hook in hooks:
        started = time.perf_counter()
        if progress:
            progress(hook, 0, widths[hook])  # the hook's activations are loaded (or recomputed) first
        pages = HookPages(catalog, hook, k=k)
        loaded = time.perf_counter()
        if os.sep in hook or hook.startswith("."):
            raise OutputError(f"{hook!r} cannot be a folder name under --out.")
        folder = root / hook
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        if fmt == "neuronpedia":
            for name, batch in neuronpedia.batches(catalog, hook, pages):
                written += write(folder / name, render_json(batch, indent=False))
                summary["files"] += 1
        else:
            for n in range(pages.width):
                doc = pages.document(n)
                if fmt == "html":
                    text = render_html(doc, site)
                elif fmt == "neuron-record":
                    text = render_json(neuron_record(doc, int(catalog.model.n_layers)), indent=False)
                else:
                    text = render_json(doc, indent=False)
                written += write(folder / f"{n}.{'html' if fmt == 'html' else 'json'}", text)
                if progress:
                    progress(hook, n + 1, pages.width)
            summary["files"] += pages.width
            if fmt == "html":
                written += write(folder / "index.html", _hook_index(pages))
                summary["files"] += 1
        summary["bytes"] += written
        summary["hooks"][hook] = {
            "neurons": pages.width, "source": pages.source.source,
            "load_s": round(loaded - started, 3), "render_s": round(time.perf_counter() - loaded, 3),
        }
    if fmt == "html":
        summary["bytes"] += write(root / "index.html", _site_index(catalog, hooks))
        summary["files"] += 1
    summary["removed"] = _remove_stale_pages(root, paths)
    _write_file(root / EXPORT_MARKER, json.dumps({**marker, "complete": True}) + "\n")
    return summary


def _hook_index(pages: HookPages) -> str:
    c = pages.stats.columns
    tokens = pages.tokens.columns
    top = {}
    for neuron, rank, token in zip(tokens["neuron"], tokens["rank"], tokens["token"]):
        if rank <= 3:
            top.setdefault(int(neuron), []).append(visible(token))
    columns = {"neuron": c["neuron"].astype(int).tolist()}
    for name in ("max", "min", "mean", "std", "frac_active", "kurtosis", "skew"):
        columns[name] = [finite(x) for x in np.asarray(c[name], np.float64).tolist()]
    columns["top_tokens"] = [" | ".join(top.get(n, [])) for n in columns["neuron"]]
    return _env().get_template("hook.html").render(
        hook=pages.hook, model=model_title(pages.catalog.model.name), width=pages.width, css=_asset("actscope.css"),
        data=script_json({"hook": pages.hook, "columns": columns}), js=_script("hook.js"),
    )


def _site_index(catalog: Catalog, hooks: list[str]) -> str:
    spec = catalog.store.spec
    return _env().get_template("site.html").render(
        model=model_title(catalog.model.name), store=catalog.store.url, corpus=f"{spec.dataset.path} {spec.dataset.data_files or ''}",
        n_tokens=f"{catalog.store.n_seq * spec.context_length:,}", css=_asset("actscope.css"),
        hooks=[{"name": h, "width": catalog.model.hook_widths[h], "source": "dense" if h in spec.dense else "recomputed"} for h in hooks],
    )


def _write_file(path: Path, text: str) -> int:
    """Write a file whole: to a temporary name, then renamed, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)
