"""results.json → report.md (plus the plots' PNGs), written atomically, and reading results.json back.

The report reads top-down for a person: title line (recipe, preset, status, date), what is missing if the run is
partial, the claims table with computed verdicts, the arms table (final metrics as mean ± std over complete seeds),
derived quantities, plots, environment, and the resolved config in a collapsed ``<details>`` block.

Everything is computed from the results document alone — the recipe is never imported — so ``effml report RUN_DIR``
re-renders a finished or interrupted run, and re-rendering a reloaded results.json gives the same text.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from effml.io import atomic_write_bytes, atomic_write_text
from effml.report.claims import VERDICTS, ClaimResult, evaluate_claims, seed_sort_key
from effml.report.plots import Plot, plot_from_dict
from effml.report.stats import format_mean_spread, format_number, mean_interval

__all__ = ["RESULTS_FILE", "REPORT_FILE", "render_report", "write_report", "load_results", "partial_run_warning"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


# --- small formatting helpers ---------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "—" if value is None else str(value)


def _date_text(created: Any) -> str:
    if not isinstance(created, str):
        return "unknown date"
    try:
        moment = datetime.fromisoformat(created)
    except ValueError:
        return created
    return moment.strftime("%Y-%m-%d %H:%M %Z").strip()


def _dict_of_dicts(value: Any) -> dict[str, dict[str, Any]]:
    """``value`` with malformed entries dropped (partial or hand-edited results must still render)."""
    if not isinstance(value, dict):
        return {}
    return {str(key): entry for key, entry in value.items() if isinstance(entry, dict)}


def _runs(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return _dict_of_dicts(entry.get("runs"))


def _complete_runs(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # Derived entries carry no status: they are computed only from finished seeds.
    return {seed: run for seed, run in _runs(entry).items() if run.get("status", "complete") == "complete"}


# --- sections -------------------------------------------------------------------------------------------------


def _seed_list(value: Any) -> set[str] | None:
    """The seeds of a JSON list (ints or names), or None when ``value`` is not a list."""
    if not isinstance(value, list):
        return None
    return {str(seed) for seed in value if isinstance(seed, (int, str)) and not isinstance(seed, bool)}


def _expected_seeds(results: dict[str, Any], arm: dict[str, Any] | None = None) -> list[str]:
    """The seeds ``arm`` should have: those it has a run for plus its own list ``seeds`` when it records one
    (``Experiment.arm_seeds``). Without that list, or without an arm: every seed an arm without its own list has a
    run for, plus the seeds the config asks for, which it names either as a list ``seeds`` or, following
    ``Experiment.seeds``, as a first ``seed`` and a count ``seeds`` (seeds ``seed, seed + 1, ...``).
    """
    own = _seed_list(arm.get("seeds")) if arm is not None else None
    if own is not None:
        return sorted(own | set(_runs(arm)), key=seed_sort_key)
    seeds = {seed for entry in _dict_of_dicts(results.get("arms")).values() if _seed_list(entry.get("seeds")) is None
             for seed in _runs(entry)}
    config = results.get("config")
    config = config if isinstance(config, dict) else {}
    listed, first = config.get("seeds"), config.get("seed", 0)
    if isinstance(listed, list):
        seeds |= _seed_list(listed) or set()
    elif isinstance(listed, int) and not isinstance(listed, bool) and isinstance(first, int):
        seeds |= {str(first + index) for index in range(listed)}
    return sorted(seeds, key=seed_sort_key)


def _title_section(results: dict[str, Any]) -> str:
    recipe = results.get("recipe", "unnamed recipe")
    lines = [f"# {recipe} — effml report", ""]
    if results.get("description"):
        lines += [str(results["description"]), ""]
    lines.append(
        f"preset `{results.get('preset', '?')}` · status **{results.get('status', 'unknown')}** · "
        f"created {_date_text(results.get('created'))}"
    )
    return "\n".join(lines)


def _gaps(results: dict[str, Any]) -> dict[str, str]:
    """Per arm with something unfinished: what (``"no runs"``, or ``"seed 1 partial, seed 2 not started"``)."""
    gaps = {}
    for name, arm in _dict_of_dicts(results.get("arms")).items():
        runs = _runs(arm)
        if not runs:
            gaps[name] = "no runs"
            continue
        unfinished = []
        for seed in _expected_seeds(results, arm):
            status = runs[seed].get("status", "complete") if seed in runs else "not started"
            if status != "complete":
                unfinished.append(f"seed {seed} {status}")
        if unfinished:
            gaps[name] = ", ".join(unfinished)
    return gaps


def partial_run_warning(results: dict[str, Any]) -> str:
    """One line warning that the verdicts come from a run that is not complete (its status is not "complete", or an
    arm lacks complete seeds), or "" for a complete run. report.md shows it above the claims and ``effml report``
    prints it above the verdicts, in the same words."""
    status = results.get("status", "complete")
    gaps = _gaps(results)
    if not gaps and status == "complete":
        return ""
    arms = len(_dict_of_dicts(results.get("arms")))
    return (f"WARNING: partial results (run status {status!r}; {len(gaps)} of {arms} arms lack complete seeds): the "
            "verdicts count only the complete runs and may change when the run is resumed or finished.")


def _missing_section(results: dict[str, Any]) -> str:
    """What a partial run has not finished: per arm, the seeds without a complete run and why."""
    problems = [f"- `{name}`: {what}" for name, what in _gaps(results).items()]
    if not problems and results.get("status", "complete") == "complete":
        return ""
    lines = ["## Missing measurements", ""]
    if problems:
        lines += ["Only complete runs count towards verdicts, tables and metric plots. Not complete:", "", *problems]
    else:
        lines.append(f"The run's status is {results.get('status')!r}, but every listed arm has all its seeds complete.")
    return "\n".join(lines)


def _claims_section(claim_results: list[ClaimResult], warning: str) -> str:
    lines = ["## Claims", ""]
    if warning:
        lines += [f"> {warning}", ""]
    if not claim_results:
        return "\n".join(lines + ["No claims declared."])
    counts = {verdict: sum(r.verdict == verdict for r in claim_results) for verdict in VERDICTS}
    lines.append(" · ".join(f"{verdict}: {count}" for verdict, count in counts.items()))
    lines.append("")
    rows = [[f"`{r.name}`", r.statement, f"**{r.verdict}**", r.evidence] for r in claim_results]
    lines.append(_table(["claim", "statement", "verdict", "evidence"], rows))
    lines += [
        "",
        "A claim holds (fails) when the whole Student-t confidence interval over seeds lies on the good (bad) side of "
        "its margin; otherwise it is inconclusive. Only complete runs count.",
    ]
    return "\n".join(lines)


def _metric_summary(values: list[Any]) -> str:
    """mean ± std of the finite values, noting any non-finite (diverged) ones."""
    numeric = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    finite = [v for v in numeric if math.isfinite(v)]
    if not finite:
        return "non-finite" if numeric else "—"
    summary = mean_interval(finite)
    text = format_mean_spread(summary.mean, summary.std)
    dropped = len(numeric) - len(finite)
    return f"{text} ({dropped} non-finite)" if dropped else text


def _metric_names(entries: dict[str, dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for entry in entries.values():
        for run in _complete_runs(entry).values():
            metrics = run.get("metrics")
            names.update(dict.fromkeys(metrics if isinstance(metrics, dict) else []))
    return list(names)


def _metric_cells(entry: dict[str, Any], metric_names: list[str]) -> list[str]:
    metrics = [run["metrics"] for run in _complete_runs(entry).values() if isinstance(run.get("metrics"), dict)]
    return [_metric_summary([m[name] for m in metrics if name in m]) for name in metric_names]


def _arms_section(results: dict[str, Any]) -> str:
    arms = _dict_of_dicts(results.get("arms"))
    lines = ["## Arms", ""]
    if not arms:
        return "\n".join(lines + ["No arms recorded yet."])
    info_keys: dict[str, None] = {}
    for arm in arms.values():
        info = arm.get("info")
        info_keys.update(dict.fromkeys(info if isinstance(info, dict) else []))
    metric_names = _metric_names(arms)
    rows = []
    for name, arm in arms.items():
        params = arm.get("params")
        info = arm.get("info") if isinstance(arm.get("info"), dict) else {}
        rows.append(
            [
                f"`{name}`",
                str(arm.get("label", "")),
                f"{params:,}" if isinstance(params, int) and not isinstance(params, bool) else _scalar_text(params),
                *[_scalar_text(info.get(key)) for key in info_keys],
                f"{len(_complete_runs(arm))}/{len(_expected_seeds(results, arm))}",
                *_metric_cells(arm, metric_names),
            ]
        )
    header = ["arm", "label", "params", *info_keys, "seeds done", *metric_names]
    lines.append(_table(header, rows))
    lines += ["", "Final metrics: mean ± std over complete seeds."]
    return "\n".join(lines)


def _derived_section(results: dict[str, Any]) -> str:
    derived = _dict_of_dicts(results.get("derived"))
    if not derived:
        return ""
    metric_names = _metric_names(derived)
    rows = [
        [f"`{name}`", str(entry.get("label", "")), str(len(_complete_runs(entry))), *_metric_cells(entry, metric_names)]
        for name, entry in derived.items()
    ]
    table = _table(["quantity", "label", "seeds", *metric_names], rows)
    note = "Computed per seed from several arms; mean ± std over seeds."
    return "\n".join(["## Derived quantities", "", table, "", note])


def _plots_section(plots: list[Plot], results: dict[str, Any]) -> str:
    if not plots:
        return ""
    lines = ["## Plots"]
    for plot in plots:
        lines += ["", f"### {plot.title or plot.name}", "", f"![{plot.title or plot.name}]({plot.filename})"]
        caption = plot.caption(results)
        if caption:
            lines += ["", caption]
    return "\n".join(lines)


def _environment_section(results: dict[str, Any]) -> str:
    environment = results.get("environment")
    if not isinstance(environment, dict) or not environment:
        return ""
    rows = [[str(key), _scalar_text(value)] for key, value in environment.items()]
    return "\n".join(["## Environment", "", _table(["key", "value"], rows)])


def _config_section(results: dict[str, Any]) -> str:
    if "config" not in results:
        return ""
    config_json = json.dumps(results["config"], indent=2, ensure_ascii=False, default=str)
    return "\n".join(
        [
            "## Config",
            "",
            "<details><summary>Resolved config</summary>",
            "",
            "```json",
            config_json,
            "```",
            "",
            "</details>",
        ]
    )


# --- public API -----------------------------------------------------------------------------------------------


def render_report(results: dict[str, Any], run_dir: Path) -> str:
    """Write the plots' PNGs into ``run_dir`` and return the report.md text for the results document ``results``."""
    if not isinstance(results, dict):
        raise TypeError(f"render_report expects the results document (a dict), got {type(results).__name__}.")
    run_dir = Path(run_dir)
    claim_results = evaluate_claims(results)
    declared_plots = results.get("plots", [])
    if not isinstance(declared_plots, list):
        raise TypeError(f"results['plots'] must be a list of plot dicts, got {type(declared_plots).__name__}.")
    plots = [plot_from_dict(entry) for entry in declared_plots]
    for plot in plots:
        atomic_write_bytes(run_dir / plot.filename, plot.render_png(results))
    sections = [
        _title_section(results),
        _missing_section(results),
        _claims_section(claim_results, partial_run_warning(results)),
        _arms_section(results),
        _derived_section(results),
        _plots_section(plots, results),
        _environment_section(results),
        _config_section(results),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def write_report(run_dir: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and then ``report.md`` (and the plots) into ``run_dir``, each file atomically.

    results.json goes first so that the measurements are safe on disk even if rendering fails.
    """
    if not isinstance(results, dict):
        raise TypeError(f"write_report expects the results document (a dict), got {type(results).__name__}.")
    run_dir = Path(run_dir)
    try:
        results_text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"write_report: the results document is not JSON-serialisable ({exc}); convert tensors and numpy "
            f"values to Python floats/ints/lists before writing."
        ) from exc
    atomic_write_text(run_dir / RESULTS_FILE, results_text)
    atomic_write_text(run_dir / REPORT_FILE, render_report(results, run_dir))


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read the results document from ``run_dir/results.json`` (or from ``run_dir`` if it is the JSON file itself)."""
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".json":
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No results file at {path}. `effml report` reads the {RESULTS_FILE} that `effml run` writes into its run "
            f"directory (runs/<recipe>/<timestamp>/); pass that directory, or re-run the recipe if it never started."
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}). The file is corrupt or was edited by hand; restore it from a copy, "
            f"or re-run the recipe (`effml run <recipe>`) to regenerate it."
        ) from exc
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict):
        raise ValueError(
            f"{path} is JSON but not an effml results document (expected an object with an 'arms' table). "
            f"Pass the run directory that `effml run` created, whose {RESULTS_FILE} it wrote."
        )
    return results
