"""HTML page of a head comparison; every figure and thumbnail is embedded, so it opens offline."""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any

from pipeline.metrics import METRICS
from pipeline.report import MAX_THUMBNAILS, TABLE_METRICS, thumbnail_uri

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 80rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.45rem; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } td.text { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: 600; } tr.failed td { color: #a00; }
.grid { display: flex; flex-wrap: wrap; gap: 0.8rem; } .grid figure { margin: 0; }
.thumb { width: 9rem; font-size: 0.7rem; word-break: break-all; } .thumb img { display: block; }
code { background: #f5f5f5; padding: 0 0.2rem; }
"""


def _cell(value: Any, text: bool = False) -> str:
    if value is None:
        shown = "-"
    elif isinstance(value, float):
        shown = f"{value:.4f}"
    else:
        shown = str(value)
    return f'<td class="text">{escape(shown)}</td>' if text else f"<td>{escape(shown)}</td>"


def _data_section(summary: dict[str, Any]) -> str:
    parts = ["<h2>Data and feature spec</h2>"]
    for cache in summary["caches"]:
        spec = cache["spec"]
        rows = ", ".join(f"{name} {count}" for name, count in cache["rows"].items())
        split_note = " (cut from an unsplit tree, seeded)" if cache["derived_splits"] else ""
        parts.append(
            f"<h3>{escape(cache['label'])}</h3><ul>"
            f"<li>feature spec: {escape(cache['description'])}; precision {escape(spec['precision'])}, "
            f"stored as {escape(spec['store_dtype'])}; features {escape(str(cache['feature_shape']))}</li>"
            f"<li>spec digest <code>{escape(cache['spec_digest'][:16])}</code>; cache <code>{escape(cache['cache'])}</code></li>"
            f"<li>images from <code>{escape(cache['data_root'] or 'unknown')}</code>; classes "
            f"{escape(', '.join(cache['classes']))}</li>"
            f"<li>rows: {escape(rows)}{split_note}"
            f"{'; streamed in chunks (above the memory budget)' if cache['streaming'] else ''}</li></ul>"
        )
    return "\n".join(parts)


def _settings_section(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    metric, split = summary["select"]["metric"], summary["select"]["split"]
    direction = "higher" if METRICS[metric] else "lower"
    if settings["cv"]:
        search = (f"hyperparameters chosen by {settings['cv']}-fold stratified cross-validation over the train "
                  "and validation rows")
    else:
        search = ("hyperparameters chosen on the validation split (by 5-fold stratified cross-validation on "
                  "train for a cache without one)")
    items = [
        f"heads ranked by {split} {metric} ({direction} is better)",
        search,
        f"grid {settings['grid']}; refit on {settings['refit']}; seed {settings['random_state']}",
    ]
    if settings.get("memory_budget"):
        items.append(f"memory budget {settings['memory_budget']} bytes")
    if summary.get("seconds") is not None:
        items.append(f"fitting and evaluating took {summary['seconds']:.1f} s")
    return "<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>"


def _results_section(summary: dict[str, Any]) -> str:
    metric, split = summary["select"]["metric"], summary["select"]["split"]
    best = (summary.get("best") or {}).get("label")
    header = (["rank", "head", "cache", f"{split} {metric}"] + [f"test {m}" for m in TABLE_METRICS]
              + ["fit s", "search s", "predict ms / 1000", "selection", "probabilities", "PCA", "parameters"])
    lines = ["<h2>Results (best first)</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for rank, result in enumerate(summary["results"], start=1):
        css = ""
        if result["label"] == best:
            css = "best"
        elif result.get("error"):
            css = "failed"
        cells = [_cell(rank), _cell(result["label"], True), _cell(result["cache_label"], True),
                 _cell((result.get(split) or {}).get(metric))]
        cells += [_cell((result.get("test") or {}).get(m)) for m in TABLE_METRICS]
        if result.get("error"):
            cells.append(f'<td class="text" colspan="7">failed: {escape(result["error"])}</td>')
        else:
            params = json.dumps(result.get("params", {}), sort_keys=True, default=str)
            cells += [_cell(result.get("fit_seconds")), _cell(result.get("search_seconds")),
                      _cell(result.get("predict_ms_per_1000")), _cell(result.get("selection"), True),
                      _cell(result.get("probabilities"), True), _cell(result.get("pca")), _cell(params, True)]
        lines.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    lines.append("</table>")
    lines.append("<p>Probabilities <em>decision</em>: the head gives decision scores only; they are turned into "
                 "softmax scores for ranking and prediction, and log loss and Brier score are not computed.</p>")
    return "\n".join(lines)


def _grid_section(summary: dict[str, Any]) -> str:
    lines = ["<h2>Hyperparameter search</h2>"]
    for result in summary["results"]:
        if result.get("error"):
            continue
        rows = "".join(
            f"<tr>{_cell(json.dumps(c['params'], sort_keys=True, default=str), True)}{_cell(c['validation'])}"
            f"{_cell(c['seconds'])}</tr>" for c in result.get("grid", [])
        )
        lines.append(f"<details><summary>{escape(result['label'])}: {len(result.get('grid', []))} candidate(s), "
                     f"selected by {escape(result['selected_by'])} on {escape(result['selection'])}</summary>"
                     f"<table><tr><th>parameters</th><th>{escape(result['selected_by'])}</th><th>seconds</th></tr>"
                     f"{rows}</table></details>")
    return "\n".join(lines)


def _figure_sections(figures: dict[str, Any]) -> str:
    parts = []
    if figures.get("timing"):
        parts.append(f'<h2>Accuracy and fit time</h2><img alt="test accuracy and fit seconds per head" '
                     f'src="{figures["timing"]}">')
    if figures.get("roc"):
        parts.append("<h2>ROC curves (test)</h2><div class=\"grid\">" + "".join(
            f'<figure><img alt="ROC curves of {escape(label)}" src="{uri}"></figure>'
            for label, uri in figures["roc"].items()) + "</div>")
    if figures.get("confusion"):
        parts.append("<h2>Confusion matrices (test)</h2><div class=\"grid\">" + "".join(
            f'<figure><img alt="confusion matrix of {escape(label)}" src="{uri}"></figure>'
            for label, uri in figures["confusion"].items()) + "</div>")
    return "\n".join(parts)


def _thumbnails(title: str, entries: list[dict[str, Any]], empty: str) -> str:
    lines = [f"<h3>{escape(title)} ({len(entries)})</h3>"]
    if not entries:
        return lines[0] + f"<p>{escape(empty)}</p>"
    lines.append('<div class="grid">')
    for entry in entries[:MAX_THUMBNAILS]:
        uri = thumbnail_uri(entry["file"]) if entry["file"] else None
        picture = f'<img alt="{escape(entry["path"])}" src="{uri}">' if uri else "<em>(image file not found)</em>"
        predicted = ", ".join(sorted(set(entry["predicted"].values())))
        lines.append(f'<div class="thumb">{picture}{escape(entry["path"])}<br>true {escape(entry["true"])}, '
                     f"predicted {escape(predicted)}</div>")
    lines.append("</div>")
    if len(entries) > MAX_THUMBNAILS:
        rest = ", ".join(e["path"] for e in entries[MAX_THUMBNAILS:])
        lines.append(f"<p>{len(entries) - MAX_THUMBNAILS} more without thumbnails: {escape(rest)}</p>")
    return "\n".join(lines)


def _misclassified_section(summary: dict[str, Any]) -> str:
    found = summary.get("misclassified") or {}
    best = (summary.get("best") or {}).get("label", "the best head")
    return "\n".join([
        (f"<h2>Misclassified test images</h2><p>Compared over {found.get('heads', 0)} head(s), "
         "matched by image content.</p>"),
        _thumbnails("Wrong in every head", found.get("all_heads", []), "No image was misclassified by every head."),
        _thumbnails(f"Wrong only in the best head ({best})", found.get("only_best", []),
                    "No image was misclassified by the best head alone."),
    ])


def render_html(summary: dict[str, Any], figures: dict[str, Any]) -> str:
    """Return the whole report page for a comparison summary and its drawn figures."""
    best = summary.get("best")
    if best:
        headline = (f"<p><strong>Best: {escape(best['label'])}</strong> ({escape(best['split'])} "
                    f"{escape(best['metric'])} {best['value']:.4f}), saved to <code>{escape(best['model_path'])}</code> "
                    "for <code>convcache predict</code>.</p>")
    else:
        headline = "<p><strong>No head has a value for the selection metric; no model was saved.</strong></p>"
    created = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return "\n".join([
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>convcache comparison {escape(summary["run"])}</title>',
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Head comparison {escape(summary['run'])}</h1><p>Written {escape(created)}.</p>",
        headline,
        _settings_section(summary),
        _data_section(summary),
        _results_section(summary),
        _figure_sections(figures),
        _misclassified_section(summary),
        _grid_section(summary),
        "</body></html>",
    ])
