"""The fusion study's results: every run's per-query hits read back, the statistics, the
conclusion, and ``fusion/``'s files (``study.json``, ``table.txt``, the two plots).

``jfe_jax.study`` runs the study and re-exports these names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jfe_jax.data.mbeir import TASK_GROUPS
from jfe_jax.eval import stats
from jfe_jax.eval.recall import task_id
from jfe_jax.paths import absolute

STUDY_DIR = "fusion"
STUDY_FILE = "study.json"
REFERENCE = "early"  # the system every other is compared with (jfe_jax.study.SYSTEMS)
ABLATIONS = ("image", "text")  # the modality removed when measuring fusion need
# A task counts as learned by a system at this multiple of its chance recall (issue 16's bar):
# a difference on a task one system has not learned says little about where modalities meet.
LEARNED_MULTIPLE = 5.0


def _results(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def per_query_hits(results: dict[str, Any]) -> dict[str, tuple[list[str], np.ndarray]]:
    """{task: (qids, hits at the headline k)} from an evaluation's results.json."""
    out = {}
    for task, detail in results["details"].items():
        per_query = detail.get("per_query")
        if per_query is None:
            raise ValueError(
                f"results for {task} have no per-query hits: evaluated by an older jfe-jax; "
                "delete the eval folder and rerun"
            )
        (key,) = [k for k in per_query if k.startswith("hit_at_")]
        out[task] = (per_query["qids"], np.asarray(per_query[key], np.float64))
    return out


def collect(
    workdir: str,
    systems: Sequence[str],
    seeds: int,
    *,
    replicates: int = stats.DEFAULT_REPLICATES,
) -> dict[str, Any]:
    """Reads every run's per-query hits and computes the study's statistics."""
    workdir = absolute(workdir)
    hits: dict[str, dict[str, list[np.ndarray]]] = {}
    qids: dict[str, list[str]] = {}
    need_hits: dict[str, list[np.ndarray]] = {}
    for system in systems:
        hits[system] = {}
        for seed in range(seeds):
            run_dir = os.path.join(workdir, system, f"seed{seed}")
            full = per_query_hits(_results(os.path.join(run_dir, "eval", "results.json")))
            for task, (ids, values) in full.items():
                if qids.setdefault(task, ids) != ids:
                    raise ValueError(f"{run_dir}: {task} was evaluated on other test queries")
                hits[system].setdefault(task, []).append(values)
            if system == REFERENCE:
                ablated = [
                    per_query_hits(_results(os.path.join(run_dir, f"eval_no_{d}", "results.json")))
                    for d in ABLATIONS
                ]
                for task, (_, values) in full.items():
                    # The better ablation of this seed, by its mean: its per-query hits (the
                    # per-query maximum of both would score their union, above either one).
                    best_without = max((a[task][1] for a in ablated), key=np.mean)
                    need_hits.setdefault(task, []).append(values - best_without)
    arrays = {s: {t: np.stack(v) for t, v in tasks.items()} for s, tasks in hits.items()}
    tasks = list(qids)
    groups = {group: [t for t in tasks if task_id(t) in ids] for group, ids in TASK_GROUPS.items()}
    comparison = stats.compare_systems(
        arrays, groups=groups, reference=REFERENCE, replicates=replicates
    )
    boot = stats.Bootstrap(replicates)  # the same draws as compare_systems': paired with it
    need = {t: np.stack(v) for t, v in need_hits.items()}
    need_means, need_reps = stats.task_means(need, boot)
    ref_means, ref_reps = stats.task_means(arrays[REFERENCE], boot)
    need_section: dict[str, Any] = {
        "tasks": {
            t: stats.percentile_interval(need_means[t], need_reps[t]).to_dict() for t in tasks
        },
        "relation": {},
    }
    for system in systems:
        if system == REFERENCE:
            continue
        means, reps = stats.task_means(arrays[system], boot)
        diff = {t: ref_means[t] - means[t] for t in tasks}
        diff_reps = {t: ref_reps[t] - reps[t] for t in tasks}
        try:
            need_section["relation"][system] = stats.slope_with_interval(
                need_means, diff, need_reps, diff_reps
            )
        except ValueError as e:  # fewer than 3 tasks, or every task with the same need
            need_section["relation"][system] = {"error": str(e)}
    result = {
        "settings": {"systems": list(systems), "seeds": seeds, "reference": REFERENCE},
        "tasks": tasks,
        "qids": qids,
        "hits": {s: {t: a.astype(int).tolist() for t, a in ts.items()} for s, ts in arrays.items()},
        "need_hits": {t: a.astype(int).tolist() for t, a in need.items()},
        "statistics": comparison,
        "fusion_need": need_section,
    }
    result.update(_chance_multiples(workdir, arrays))
    result["conclusion"] = conclusion(result)
    return result


def _chance_multiples(workdir: str, arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Each system's recall per task and seed as a multiple of the task's chance recall, from
    the data's manifest ({} without one: hits written by hand)."""
    from jfe_jax.data.synthetic.generate import MANIFEST_FILE, chance_at_headline_k

    path = os.path.join(workdir, "data", MANIFEST_FILE)
    if not os.path.isfile(path):
        return {}
    chance = chance_at_headline_k(_results(path))
    return {
        "chance": {t: chance[t] for t in next(iter(arrays.values())) if t in chance},
        "chance_multiples": {
            system: {
                t: [round(float(np.mean(seed) / chance[t]), 3) for seed in a]
                for t, a in tasks.items()
                if t in chance
            }
            for system, tasks in arrays.items()
        },
    }


def learned_lines(result: dict[str, Any]) -> list[str]:
    """Per system: whether it reached LEARNED_MULTIPLE x chance on every task in every seed."""
    lines = []
    for system, tasks in result.get("chance_multiples", {}).items():
        under = [
            (t, seed, m)
            for t, ms in tasks.items()
            for seed, m in enumerate(ms)
            if m < LEARNED_MULTIPLE
        ]
        if under:
            listed = ", ".join(f"{t} seed {seed} ({m:.1f}x)" for t, seed, m in under)
            lines.append(f"{system} is under {LEARNED_MULTIPLE:g}x chance on: {listed}.")
        else:
            t, seed, m = min(
                ((t, seed, m) for t, ms in tasks.items() for seed, m in enumerate(ms)),
                key=lambda x: x[2],
            )
            lines.append(
                f"{system} reaches {LEARNED_MULTIPLE:g}x chance or more on every task in every "
                f"seed (lowest: {t} seed {seed}, {m:.1f}x)."
            )
    return lines


def _under_learned(result: dict[str, Any], system: str, tasks: Sequence[str]) -> list[str]:
    """The tasks of ``tasks`` on which ``system`` is under LEARNED_MULTIPLE x chance in some
    seed."""
    multiples = result["chance_multiples"][system]
    return [t for t in tasks if t not in multiples or min(multiples[t]) < LEARNED_MULTIPLE]


def conclusion(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system compared with the reference: whether the study may state the claim (the
    slope's verdict, either way), ``{"stated": bool, "reason": str | None}``.

    Only when both systems reach LEARNED_MULTIPLE x chance on every task of the fit in every
    seed: a slope over tasks a system has not learned says nothing about where the modalities
    should meet. The reason has one clause per system under the bar, naming its tasks."""
    out = {}
    for system, relation in result["fusion_need"]["relation"].items():
        if "slope" not in relation:
            out[system] = {"stated": False, "reason": f"no slope: {relation['error']}"}
            continue
        if "chance_multiples" not in result:
            out[system] = {
                "stated": False,
                "reason": "chance recall unknown (no data manifest): whether the systems "
                "learned the tasks cannot be checked",
            }
            continue
        clauses = []
        for name in (REFERENCE, system):
            under = _under_learned(result, name, relation["tasks"])
            if under:
                clauses.append(f"{name} under {LEARNED_MULTIPLE:g}x chance on {', '.join(under)}")
        reason = "; ".join(clauses) or None
        out[system] = {"stated": reason is None, "reason": reason}
    return out


def statement(result: dict[str, Any]) -> str:
    """What the study shows and does not show, in plain words, whatever the outcome."""
    comparison = result["statistics"]
    lines = []
    level = int(round(100 * comparison["level"]))
    for system, diff in comparison["differences"].items():
        wins = [t for t, d in diff["tasks"].items() if d["decision"] == f"{system} wins"]
        losses = [t for t, d in diff["tasks"].items() if d["decision"].startswith(REFERENCE)]
        undecided = [t for t, d in diff["tasks"].items() if d["decision"] == "no decision"]
        avg = diff["average"]
        lines.append(
            f"{REFERENCE} vs {system} over {result['settings']['seeds']} seeds: "
            f"{REFERENCE} wins on {len(losses)} tasks, {system} wins on {len(wins)}, and "
            f"{len(undecided)} have no decision ({level}% intervals of the paired difference). "
            f"Average difference ({REFERENCE} - {system}) {-100 * avg['estimate']:+.1f} points "
            f"[{-100 * avg['high']:+.1f}, {-100 * avg['low']:+.1f}]: {avg['decision']}."
        )
        relation = result["fusion_need"]["relation"].get(system, {})
        decided = (result.get("conclusion") or conclusion(result))[system]
        if "slope" not in relation:
            lines.append(
                f"Slope of ({REFERENCE} - {system}) over fusion need: no conclusion: "
                f"{decided['reason']}."
            )
        else:
            s = relation["slope"]
            verdict = {
                "positive": "early fusion's advantage grows with the task's fusion need, as JFE "
                "claims",
                "negative": "early fusion's advantage shrinks with fusion need, against JFE's "
                "claim",
                "no decision": "the relation between advantage and fusion need is not decided "
                "by these runs",
            }[s["decision"]]
            if not decided["stated"]:
                verdict = f"no conclusion: {decided['reason']}"
            lines.append(
                f"Slope of ({REFERENCE} - {system}) over fusion need across "
                f"{len(relation['tasks'])} tasks: {s['estimate']:+.2f} "
                f"[{s['low']:+.2f}, {s['high']:+.2f}]: {verdict}."
            )
    lines.extend(learned_lines(result))
    lines.append(
        "Shown: differences between these systems on this synthetic data at this model size "
        "and budget. Not shown: anything about real M-BEIR, real Qwen2-VL sizes or other "
        "budgets."
    )
    return "\n".join(lines)


def study_table(result: dict[str, Any]) -> str:
    """Per task and group: each system's mean [interval], the difference and the decision."""
    comparison = result["statistics"]
    systems = list(comparison["systems"])
    others = [s for s in systems if s != REFERENCE]

    def cell(interval):
        return (
            f"{100 * interval['estimate']:5.1f} "
            f"[{100 * interval['low']:5.1f},{100 * interval['high']:5.1f}]"
        )

    need = result["fusion_need"]["tasks"]
    header = f"{'':<18}" + "".join(f"{s:>20}" for s in systems)
    header += "".join(f"{REFERENCE + '-' + s:>22}{'':<16}" for s in others) + f"{'need':>8}"
    lines = [header, "-" * len(header)]
    rows = [(t, "tasks") for t in result["tasks"]]
    rows += [(g, "groups") for g in comparison["systems"][REFERENCE]["groups"]]
    rows += [("average", None)]
    for name, section in rows:
        pick = (lambda d: d[section][name]) if section else (lambda d: d["average"])  # noqa: B023
        line = f"{name:<18}" + "".join(
            f"{cell(pick(comparison['systems'][s])):>20}" for s in systems
        )
        for s in others:
            d = pick(comparison["differences"][s])
            signed = (
                f"{-100 * d['estimate']:+5.1f} [{-100 * d['high']:+5.1f},{-100 * d['low']:+5.1f}]"
            )
            line += f"{signed:>22}  {d['decision']:<14}"
        line += f"{100 * need[name]['estimate']:>8.1f}" if section == "tasks" else f"{'':>8}"
        lines.append(line)
    return "\n".join(lines)


def write_study(workdir: str, result: dict[str, Any]) -> None:
    """``fusion/study.json``, ``table.txt`` and the two plots."""
    from jfe_jax.eval.plots import plot_need_relation, plot_study

    out = os.path.join(absolute(workdir), STUDY_DIR)
    os.makedirs(out, exist_ok=True)
    result["table"] = study_table(result)
    result["statement"] = statement(result)
    tmp = os.path.join(out, STUDY_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out, STUDY_FILE))
    with open(os.path.join(out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(result["table"] + "\n\n" + result["statement"] + "\n")
    plot_study(result, os.path.join(out, "study.png"))
    plot_need_relation(result, os.path.join(out, "need.png"))
