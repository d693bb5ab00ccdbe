"""The `outmetric` command."""

import argparse
import sys


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outmetric",
        description="Gradient descent in the Euclidean metric of the output space (JAX).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="fit an overparametrised MLP with the adapted flow, output-metric descent and Adam",
        description="Fit an overparametrised MLP to the bundled dataset (or --data) with the "
        "adapted flow, output-metric descent and an Adam baseline; print a table and write a "
        "plot of log-cost against time with the theoretical line C(0)exp(-2s/N).",
    )
    demo.add_argument("--data", help="CSV (last column = target) or NPZ (inputs, targets); "
                      "default: the bundled diabetes data")
    demo.add_argument("--eps", type=_positive_float, default=1e-10, help="target cost (default 1e-10)")
    demo.add_argument("--out", default="outmetric-demo", help="output folder (default ./outmetric-demo)")
    demo.add_argument("--width", type=_positive_int, default=64, help="hidden width (default 64)")
    demo.add_argument("--flow-samples", type=_positive_int, default=64,
                      help="samples used for the adapted-flow run (default 64)")
    demo.add_argument("--max-samples", type=_positive_int, default=None,
                      help="use only the first N samples")
    demo.add_argument("--baseline-steps", type=_positive_int, default=3000,
                      help="Adam steps for the baseline (default 3000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--compare", action="store_true",
                      help="also run the second-order baselines: optax L-BFGS and, if installed, "
                      "optimistix Gauss-Newton and Levenberg-Marquardt")
    demo.add_argument("--compare-seconds", type=_positive_float, default=60.0,
                      help="training-time cap for each --compare baseline (default 60 s)")
    demo.add_argument("--float32", action="store_true", help="run in float32 (default float64)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    from ._demo import format_table, run_demo

    try:
        report = run_demo(
            args.data, eps=args.eps, out=args.out, width=args.width,
            flow_samples=args.flow_samples, baseline_steps=args.baseline_steps,
            max_samples=args.max_samples, seed=args.seed, progress=not args.no_progress,
            compare=args.compare, compare_seconds=args.compare_seconds,
        )
    except (OSError, ValueError) as err:
        print(f"outmetric demo: error: {err}", file=sys.stderr)
        return 2
    print()
    print(f"MLP with K = {report.num_params} parameters on N = {report.num_samples} samples "
          f"(flow on N = {report.flow_samples}); training wall times exclude compilation.")
    print(format_table(report))
    print()
    print(f"plot:    {report.plot_path}")
    print(f"results: {report.json_path}")
    if args.compare:
        print("The baselines' rows are in the table above, their curves in the plot and their "
              "numbers in the results file; `python -m benchmarks.run` in the source tree runs "
              "the full comparison.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
