"""``rlhfspec operator``: run the RLHFJob controller (a wrapper around ``kopf run``).

Where it sits: the operator image's entry point (``rlhfspec_cli`` dispatches here lazily, so
``rlhfspec crd``/``validate`` never import kopf). Flags choose the watched namespaces, the
liveness endpoint and peering; they are stored in ``config.CONFIG`` *before* ``handlers`` is
imported, because kopf reads the timer interval when the decorators run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence

from rlhfspec_operator.config import CONFIG, parse_peers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfspec operator",
        description="Run the RLHFJob operator (kopf) against the current kubeconfig or the "
        "in-cluster service account.",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="watch this namespace (repeatable); pair with a Role per namespace",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="watch the whole cluster; pair with a ClusterRole",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="coordinate with other replicas through this kopf peering object",
    )
    peering.add_argument(
        "--standalone",
        action="store_true",
        help="no peering (the default unless --peering is given)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=CONFIG.interval,
        help=f"seconds between reconcile ticks of a job (default {CONFIG.interval:g})",
    )
    parser.add_argument(
        "--coordinator-url",
        default=CONFIG.coordinator_url,
        metavar="URL",
        help="read every managed job's progress from this Redis URL instead of the job's "
        "Service (an operator outside the cluster, via kubectl port-forward)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics",
    )
    policy = parser.add_argument_group(
        "admission policy", "what a job author may ask for (the chart's values set these)"
    )
    policy.add_argument(
        "--allowed-image",
        action="append",
        dest="allowed_images",
        metavar="PATTERN",
        help="a job's images must match one of these globs (repeatable; default: any image)",
    )
    policy.add_argument(
        "--allowed-redis-host",
        action="append",
        dest="allowed_redis_hosts",
        metavar="PATTERN",
        help="hosts an external coordinator URL may name, as globs (repeatable; default: "
        "none, external mode is refused)",
    )
    policy.add_argument(
        "--metrics-from",
        type=parse_peers,
        default=None,
        metavar="JSON",
        help="JSON list of NetworkPolicy peers admitted to worker pods' metrics port (Prometheus)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="same as --log-level=DEBUG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        build_parser().error("--interval must be positive")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every successful timer run at INFO: one line per job per tick is noise.
    logging.getLogger("kopf.objects").addFilter(
        lambda record: "Timer 'reconcile' succeeded" not in record.getMessage()
    )
    CONFIG.interval = args.interval
    CONFIG.coordinator_url = args.coordinator_url
    CONFIG.metrics_port = args.metrics_port
    if args.allowed_images is not None:
        CONFIG.allowed_images = args.allowed_images
    if args.allowed_redis_hosts is not None:
        CONFIG.allowed_redis_hosts = args.allowed_redis_hosts
    if args.metrics_from is not None:
        CONFIG.metrics_from = args.metrics_from

    import kopf

    # Registers the handlers in kopf's default registry (after CONFIG is final).
    importlib.import_module("rlhfspec_operator.handlers")
    kopf.run(
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespaces or (),
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
