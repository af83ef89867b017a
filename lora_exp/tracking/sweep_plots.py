"""The sweep's parent run's plots: Optuna's (optimization history, parameter importances,
parallel coordinate, or the Pareto front), every trial's loss curve, and the best objective
against the compute the search spent."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lora_exp")


def cost_curve(trials: list[Any], minimize: bool = True) -> list[tuple[float, float | None]]:
    """What the search bought for its compute: after each finished trial (in the order they
    finished), the compute hours spent so far (every trial's `compute_s`, pruned and failed ones
    too) and the best objective so far (None before the first completed trial)."""
    finished = sorted((t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t.datetime_complete),
                      key=lambda t: (t.datetime_complete, t.number))
    spent, best, out = 0.0, None, []
    for t in finished:
        spent += float(t.user_attrs.get("compute_s") or 0.0)
        if t.state.name == "COMPLETE" and t.values is not None:
            value = t.values[0]
            best = value if best is None or (value < best if minimize else value > best) else best
        out.append((spent / 3600, best))
    return out


def preload() -> None:
    """Import what drawing the plots needs (matplotlib, Optuna's plots, and its parameter
    importances, which import scikit-learn and SciPy: ~5 s on 2 cores). A pack's tracking process
    that refreshes the parent run calls it in a thread when it starts, while the first trials
    train, so the sweep's last refresh does not pay it after the last trial."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        import optuna.importance  # noqa: F401
        from optuna.visualization import matplotlib as ov  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the plots import them again, and say what fails
        log.debug("preloading the plots' modules failed: %s", exc)


def log_plots(client: Any, record: Any, study: Any, trials: list[Any]) -> None:
    """Every plot of the parent run (`record`: its `SweepRecord`), written again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if record.multi:
        plots = {"pareto_front": lambda: ov.plot_pareto_front(study, target_names=record.metrics)} if complete else {}
    elif complete:  # before the first completed trial Optuna would draw empty axes and warn of it
        plots = {"optimization_history": lambda: ov.plot_optimization_history(study),
                 "parallel_coordinate": lambda: ov.plot_parallel_coordinate(study)}
        if len(complete) >= 2 and record.n_searched >= 2:
            plots["param_importances"] = lambda: ov.plot_param_importances(study)
    else:
        plots = {}
    for name, make in plots.items():
        try:
            ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            client.log_figure(record.run_id, fig, f"plots/{name}.png")
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001 - e.g. importances need variety among trials
            log.debug("plot %s skipped: %s", name, exc)
    _plot_cost(client, record, study, trials, plt)
    fig, ax = plt.subplots(figsize=(9, 5))
    for t in sorted(trials, key=lambda t: t.number):
        curve = t.user_attrs.get("loss_curve")
        if curve:
            steps, values = zip(*curve)
            ax.plot(steps, values, label=f"{t.number} {t.state.name.lower()}", alpha=0.8,
                    linestyle="-" if t.state.name == "COMPLETE" else ":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax.set_title(f"{record.study_name}: train loss of every trial")
    if len(trials) <= 20:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    client.log_figure(record.run_id, fig, "plots/loss_curves.png")
    plt.close(fig)


def _plot_cost(client: Any, record: Any, study: Any, trials: list[Any], plt: Any) -> None:
    """The best objective against the compute hours spent (GPU hours on a GPU): where the curve
    flattens, more trials of this search buy little."""
    curve = [(h, b) for h, b in cost_curve(trials, study.directions[0].name == "MINIMIZE") if b is not None]
    if record.multi or not curve:
        return
    hours, best = zip(*curve)
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.step(hours, best, where="post", marker="o", markersize=3)
    ax.set_xlabel("compute hours spent (every trial's compute_s: GPU hours on a GPU)")
    ax.set_ylabel(f"best {record.metric} so far")
    ax.set_title(f"{record.study_name}: best {record.metric} by compute spent ({hours[-1] * 3600:.0f} s so far)")
    fig.tight_layout()
    client.log_figure(record.run_id, fig, "plots/best_per_compute_hour.png")
    plt.close(fig)
