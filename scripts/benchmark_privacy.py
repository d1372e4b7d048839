"""Privacy-utility table: a non-private federated run and each DP mechanism at each budget.

On ML-100K, Amazon Beauty or the synthetic shop at 100,000 shoppers, through the real Flower
runtime:

    python scripts/benchmark_privacy.py [--data ../shared/data]
        [--dataset ml-100k|beauty|synthetic-100k]
        [--partition silo user]
        [--epsilons 8 4 1] [--mechanisms dp_sgd central_dp] [--user "..."] [--silo "..."]
        [overrides...]

Each partition has its own recipe (--user, --silo: federated overrides), and every run of that
partition uses it, so a row differs from the non-private one only in `privacy`. Every row is the
server-side evaluation (simulation only) of the run's last round, on every shopper's validation
and test item: a private run picks no round by private figures, so the non-private one is
compared the same way. Prints the unit, epsilon spent and delta, validation and test HR@10,
test NDCG@10 and Recall@20, wall time, and the ratios of test HR@10 and wall time to the
non-private run. A run that fails is listed with its error; the others still run.

--model takes a model change under test (for example reading items from the public catalogue
alone): every run takes it, and one more non-private run without it gives a second ratio, to
today's non-private model, so that a model change cannot hide a loss. Each partition's curve,
test HR@10 against the epsilon spent, is drawn into privacy-<dataset>-<partition>.png under
--out. Given the same --out again, the runs that finished are read back.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from common import partition_parser, partition_runs, run_row

from fedrec.config import BUDGET_KEYS
from fedrec.report import save_figure

RECIPES = {
    "silo": "partition=silo num_rounds=15",
    "user": "experiment=cross_device",
}


def main() -> None:
    parser = partition_parser(__doc__.split("\n")[0], RECIPES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 4.0, 1.0])
    parser.add_argument("--mechanisms", nargs="+", default=["dp_sgd", "central_dp"],
                        choices=["dp_sgd", "central_dp"])
    parser.add_argument("--model", default="",
                        help="overrides of a model change under test, for every run; adds a "
                        "non-private run without them (default: none)")
    args = parser.parse_args()
    for partition, base, out in partition_runs(args, "privacy"):
        # Cross-device, each shopper's update is clipped where it is trained (its device, or
        # its pool node): the server never sees it alone.
        side = " privacy.side=client" if partition == "user" else ""
        runs = [("none", None, "privacy=none")] + [
            (mechanism, eps, f"privacy={mechanism} {BUDGET_KEYS[mechanism]}={eps}"
             f"{side if mechanism == 'central_dp' else ''}")
            for mechanism in args.mechanisms for eps in args.epsilons]
        results = [(mechanism, eps, _result(f"{base} {args.model} eval.server=true {privacy}",
                                            out / f"{partition}-{mechanism}-{eps}"))
                   for mechanism, eps, privacy in runs]
        today = (_result(f"{base} eval.server=true privacy=none",
                         out / f"{partition}-none-todays-model") if args.model else None)
        _print_table(partition, f"{base} {args.model}".strip(), results, today)
        # The title names every override the rows share but the dataset's path, so that a model
        # change passed in the recipe is not drawn as the default model.
        shared = " ".join([getattr(args, partition), *args.overrides, args.model]).strip()
        plot = _plot(f"{args.dataset}, {partition}: {shared}", results, today,
                     out / f"privacy-{args.dataset}-{partition}.png")
        print(f"\nplot: {plot}")


Result = tuple[dict[str, Any], dict[str, Any]] | str


def _result(overrides: str, folder: Path) -> Result:
    """A run's summary and its last round's record, or its error."""
    summary = run_row(overrides, folder)
    return summary if isinstance(summary, str) else (summary, _last_round(folder))


def _last_round(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def _test_hr(result: Result) -> float:
    return result[1]["server"]["test"]["sampled"]["hr@10"]  # type: ignore[index]


def _print_table(partition: str, base: str, results: list[tuple[str, float | None, Result]],
                 today: Result | None) -> None:
    print(f"\npartition={partition}: {base}\n")
    versus_today = today is not None and not isinstance(today, str)
    if today is not None:
        print("today's model without privacy: " + (
            f"test HR@10 {_test_hr(today):.4f}, {today[0]['wall_seconds']:.1f} s"
            if versus_today else f"failed: {today}") + "\n")
    print("| mechanism | unit | epsilon budget | epsilon spent | delta | valid HR@10 | HR@10 | "
          "NDCG@10 | Recall@20 | wall s | HR@10 / non-private | wall / non-private |"
          + (" HR@10 / today's model non-private |" if versus_today else ""))
    print("|---" * (13 if versus_today else 12) + "|")
    reference = results[0][2] if not isinstance(results[0][2], str) else None
    for mechanism, eps, result in results:
        budget = "inf" if eps is None else f"{eps:g}"
        if isinstance(result, str):
            print(f"| {mechanism} | | {budget} | failed: {result} |" + " |" * (
                9 if versus_today else 8))
            continue
        summary, last = result
        test, valid = last["server"]["test"], last["server"].get("valid", {})
        privacy = summary["privacy"]
        spent, delta = privacy["epsilon"], privacy["delta"]
        ratios = ["", ""]
        if reference is not None:
            ratios = [f"{_test_hr(result) / _test_hr(reference):.3f}",
                      f"{summary['wall_seconds'] / reference[0]['wall_seconds']:.2f}"]
        if versus_today:
            ratios.append(f"{_test_hr(result) / _test_hr(today):.3f}")
        print(f"| {mechanism} | {privacy['unit'] or '-'} | {budget} | "
              f"{'-' if spent is None else f'{spent:.3f}'} | "
              f"{'-' if delta is None else f'{delta:.2g}'} | "
              f"{valid.get('sampled', {}).get('hr@10', float('nan')):.4f} | "
              f"{test['sampled']['hr@10']:.4f} | {test['sampled']['ndcg@10']:.4f} | "
              f"{test['full']['recall@20']:.4f} | {summary['wall_seconds']:.1f} | "
              f"{' | '.join(ratios)} |", flush=True)


def _plot(title: str, results: list[tuple[str, float | None, Result]], today: Result | None,
          path: Path) -> Path:
    """Test HR@10 against the epsilon spent, a line per mechanism; the non-private runs as
    horizontal lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[tuple[float, float]]] = {}
    for mechanism, _, result in results:
        if isinstance(result, str):
            continue
        if mechanism == "none":
            ax.axhline(_test_hr(result), linestyle="--", color="black",
                       label="no privacy, same model")
        else:
            curves.setdefault(mechanism, []).append(
                (result[0]["privacy"]["epsilon"], _test_hr(result)))
    if today is not None and not isinstance(today, str):
        ax.axhline(_test_hr(today), linestyle=":", color="grey",
                   label="no privacy, today's model")
    for k, (mechanism, points) in enumerate(sorted(curves.items())):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="os"[k % 2], label=mechanism)
    if curves:
        ax.set_xscale("log")
        ticks = sorted({x for points in curves.values() for x, _ in points})
        ax.set_xticks(ticks, [f"{x:.3g}" for x in ticks])
        ax.minorticks_off()
    ax.set_ylim(bottom=0)  # a ratio read off the plot is the ratio of the heights
    # A long --model would run off the figure on one line.
    ax.set(title=textwrap.fill(title, 80), xlabel="epsilon spent (log scale)",
           ylabel="test HR@10 (last round)")
    ax.title.set_fontsize("small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
