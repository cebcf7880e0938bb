"""The diagnosis service from the command line.

  operator: medhe token add clinic-a --data-dir srv/          (prints a token once)
            medhe serve --model br35h pneumoniamnist --data-dir srv/ [--workers N] [--ssl-certfile ...]
  clinic:   medhe diagnose --server https://host:8000 --token ... --model br35h scan.dcm ...
            medhe clinic --server https://host:8000 --token ...   (a local web page on 127.0.0.1:8501)
"""

from __future__ import annotations

import os
from pathlib import Path

from medhe.errors import ConfigError


def _hosted_models(args) -> list:
    """--model NAME_OR_DIR..., --plan DIR..., --encrypted-model DIR... -> hosted models (NAME=PATH
    names one explicitly; otherwise the shipped name or the directory's name)."""
    from medhe.plan import load_plan_dir
    from medhe.service.hosting import check_distinct_names, check_name, host_plan

    def named(value: str) -> tuple[str, str]:
        name, sep, path = value.partition("=")
        return (name, path) if sep else (Path(value.rstrip("/")).name.lower(), value)

    def in_clear(path: str, throughput: bool):
        from medhe.compiler import compile_model
        from medhe.compiler.batch import compile_batch
        from medhe.nn.modeldir import resolve_model_dir

        model_dir = resolve_model_dir(path)  # a mistyped name is refused before anything is written
        compile_plan = compile_batch if throughput else compile_model
        return lambda name: host_plan(args.data_dir, name, compile_plan(model_dir), backend=args.backend)

    def from_plan_dir(path: str):
        if not Path(path).is_dir():
            raise ConfigError(f"no plan directory at {path}")
        return lambda name: host_plan(args.data_dir, name, load_plan_dir(path), backend=args.backend)

    # (name, how to host it): every name is known, and checked, before anything is written to --data-dir.
    pending = []
    for value in args.model or []:
        name, path = named(value)
        pending.append((name, in_clear(path, False)))
    for value in args.batch_model or []:
        name, path = named(value)
        pending.append((name if "=" in value else f"{name}-batch", in_clear(path, True)))
    for value in args.plan or []:
        name, path = named(value)
        pending.append((name, from_plan_dir(path)))
    for value in args.encrypted_model or []:
        name, path = named(value)
        _check_encrypted_model_dir(path)
        pending.append((name, lambda name, path=path: _host_encrypted(args, name, path)))
    if not pending:
        raise ConfigError("name at least one model to serve: --model br35h, --batch-model br35h, --plan DIR or "
                          "--encrypted-model DIR")
    check_distinct_names([name for name, _ in pending], " (name one explicitly with NAME=PATH)")
    for name, _ in pending:
        check_name(name)
    return [host(name) for name, host in pending]


def _check_encrypted_model_dir(path: str) -> None:
    from medhe.protocol.owner import ENCRYPTED_MODEL_FILE

    if not (Path(path) / ENCRYPTED_MODEL_FILE).is_file() and ((Path(path) / "arrays.npz").exists()
                                                             or not Path(path).is_dir()):
        raise ConfigError(f"--encrypted-model takes a directory from `medhe encrypt-model` (or a plan saved "
                          f"without weights); {path} is not one, or holds weights in clear")


def _host_encrypted(args, name: str, path: str):
    """--encrypted-model NAME=DIR (checked by _check_encrypted_model_dir): a plan without weights,
    and the directory's encrypted model (if it holds one) in the key store."""
    from medhe.plan import Plan
    from medhe.protocol.owner import ENCRYPTED_MODEL_FILE, load_encrypted_model
    from medhe.protocol.server import Server
    from medhe.service.hosting import host_plan

    if (Path(path) / ENCRYPTED_MODEL_FILE).is_file():
        plan, message = load_encrypted_model(path)
    else:  # the architecture only: encrypted models arrive per clinic (POST /v1/encrypted-model)
        plan, message = Plan.load(path, weights=False), None
    model = host_plan(args.data_dir, name, plan, backend=args.backend, encrypted_model=True)
    if message is not None:
        # The directory's encrypted model (for the key id it was made for) goes into the key store.
        Server(plan, backend=args.backend, key_dir=model.key_dir,
               encrypted_model=True).register_encrypted_model(message)
    return model


def _limits(args):
    from medhe.service.app import Limits

    if args.rate_limit < 0:
        raise ConfigError("--rate-limit is a number of requests a minute (0: no limit)")
    return Limits(queue_size=args.queue, evaluate_timeout_s=args.timeout, idle_upload_timeout_s=args.upload_timeout,
                  requests_per_minute=args.rate_limit, burst=args.burst)


def _check_port_free(host: str, port: int) -> None:
    """ConfigError if host:port cannot be listened on, checked before minutes of start-up and before
    a banner names an address that another program holds. (uvicorn binds the same way, with
    SO_REUSEADDR, so a port in TIME_WAIT is not refused here.)"""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio's server socket, which serves IPv6 only
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            hint = ("another program is using the port; choose another with --port" if exc.errno == errno.EADDRINUSE
                    else "check --host (an address of this machine) and --port")
            raise ConfigError(f"cannot listen on {shown} ({exc.strerror or exc}): {hint}") from None


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from medhe.service.app import create_app
    from medhe.service.auth import TokenStore
    from medhe.service.connections import http_protocol_with_header_timeout

    if not args.header_timeout > 0:
        raise ConfigError(f"--header-timeout must be a positive number of seconds, got {args.header_timeout}")
    tokens = TokenStore(args.data_dir)
    if not tokens.enabled() and not args.no_auth:
        raise ConfigError(f"no tokens in {tokens.path}: issue one per clinic with `medhe token add NAME --data-dir "
                          f"{args.data_dir}`, or pass --no-auth for a server only you can reach")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path and not Path(path).is_file():
            raise ConfigError(f"no TLS file at {path}")
    if args.two_processes and args.ray is not None:
        raise ConfigError("--two-processes forks helpers from local worker processes; it does not apply with --ray")
    if args.ray is None:
        _check_port_free(args.host, args.port)
    models = _hosted_models(args)
    if args.ray is not None:
        return _serve_on_ray(args, models, tokens)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    app = create_app(models, data_dir=args.data_dir, workers=workers, max_key_sets=args.key_cache,
                     tokens=None if args.no_auth else tokens,
                     limits=_limits(args), two_processes=args.two_processes)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scheme = "https" if args.ssl_certfile else "http"
    for model in models:
        mode = "encrypted-model mode: the weights are ciphertexts" if model.encrypted_model else "plain weights"
        print(f"model {model.name}: spec {model.spec_digest[:16]} ({mode})")
    evaluation = f"{workers} worker process(es)" if workers else "evaluation in a thread of the server (--workers 0)"
    print(f"serving on {scheme}://{args.host}:{args.port} with {evaluation}"
          f"{'' if not args.no_auth else ' WITHOUT access control (--no-auth)'}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, timeout_keep_alive=5, limit_concurrency=args.max_connections,
                http=http_protocol_with_header_timeout(args.header_timeout))
    return 0


def _serve_on_ray(args, models, tokens) -> int:
    from medhe.service.cluster import ray_application, serve_on_ray

    workers = args.workers if args.workers is not None else 1
    application = ray_application(models, args.data_dir, replicas=args.replicas, workers_per_replica=workers,
                                  max_key_sets=args.key_cache, auth=not args.no_auth,
                                  limits=_limits(args))
    scheme = "https" if args.ssl_certfile else "http"
    print(f"serving {', '.join(m.name for m in models)} on Ray ({args.ray}): {args.replicas} replica(s) x {workers} "
          f"worker process(es) at {scheme}://{args.host}:{args.port}", flush=True)
    serve_on_ray(application, address=args.ray, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                 ssl_keyfile=args.ssl_keyfile)
    return 0


def cmd_clinic(args) -> int:
    import uvicorn

    from medhe.protocol.remote import RemoteClient
    from medhe.service.clinic import ClinicApp, check_clinic_host, create_clinic_app

    if not args.allow_remote_host:
        check_clinic_host(args.host)
    if args.max_file_mb <= 0:
        raise ConfigError("--max-file-mb must be positive")
    _check_port_free(args.host, args.port)
    remote = RemoteClient(args.server, token=args.token or os.environ.get("MEDHE_TOKEN"), key_home=args.keys,
                          backend=args.backend, verify=args.ca_file or True)
    clinic = ClinicApp(remote, max_file_bytes=int(args.max_file_mb * 2**20))
    # Starlette compares the Host header as sent: an IPv6 address comes in brackets.
    hosts = ("127.0.0.1", "localhost", "[::1]", args.host) if not args.allow_remote_host else ("*",)
    app = create_clinic_app(clinic, allowed_hosts=hosts)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else f"[{args.host}]" if ":" in args.host else args.host
    print(f"medhe clinic for {args.server}: open http://{shown_host}:{args.port}/?token={clinic.access_token} in a "
          f"browser on this machine (the link holds this run's access token; keys in {remote.key_home}; Ctrl+C to "
          "stop)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        clinic.close()
        remote.close()
    return 0


def cmd_token(args) -> int:
    from medhe.service.auth import TokenStore

    store = TokenStore(args.data_dir)
    if args.action == "add":
        if not args.name:
            raise ConfigError("medhe token add NAME")
        token = store.add(args.name, args.role)
        print(f"token for {args.role} {args.name} (shown once; the server keeps only its hash):\n{token}")
    elif args.action == "revoke":
        if not args.name:
            raise ConfigError("medhe token revoke NAME")
        store.revoke(args.name)
        print(f"token of {args.name} revoked")
    else:
        for name, role in store.names():
            print(f"{name}\t{role}")
    return 0


def register(subparsers) -> None:
    from medhe.cli.he_cmd import add_backend_argument, add_ca_file_argument

    p = subparsers.add_parser("serve", help="server: run the encrypted diagnosis HTTP service")
    p.add_argument("--model", nargs="+", action="extend", metavar="NAME_OR_DIR",
                   help="shipped model names or model directories, compiled at start (NAME=DIR to name one)")
    p.add_argument("--batch-model", nargs="+", action="extend", metavar="NAME_OR_DIR",
                   help="models to host in throughput mode too, as NAME-batch (up to N/2 images per message, "
                        "POST /v1/diagnose-batch)")
    p.add_argument("--plan", nargs="+", action="extend", metavar="DIR",
                   help="compiled plan directories (from `medhe compile`)")
    p.add_argument("--encrypted-model", nargs="+", action="extend", metavar="DIR",
                   help="[NAME=]DIR, encrypted-model mode: the architecture from `medhe compile --architecture` "
                        "(each clinic's encrypted weights then arrive by POST /v1/encrypted-model), or a "
                        "directory from `medhe encrypt-model`; the server never sees the weights")
    add_backend_argument(p)
    p.add_argument("--data-dir", default="medhe-server",
                   help="where keys, encrypted models, tokens and plans are kept (default: ./medhe-server)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=None,
                   help="evaluation worker processes (default: the number of cores; 0: a thread of the server)")
    p.add_argument("--key-cache", type=int, default=4, help="key sets each worker keeps in memory (default 4)")
    p.add_argument("--two-processes", action="store_true",
                   help="each worker shares each latency-mode evaluation with a helper process it forks: "
                        "somewhat lower latency while a core is free (e.g. --workers 1 on 2 cores), more CPU "
                        "per request")
    p.add_argument("--queue", type=int, default=8, help="requests that may wait beyond those being evaluated; "
                                                         "more get 503 with Retry-After (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one evaluation may take (default 600)")
    p.add_argument("--upload-timeout", type=float, default=30.0,
                   help="seconds an upload may stall before it is dropped (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (default 10)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections beyond which new ones get 503 (default 256)")
    p.add_argument("--rate-limit", type=float, default=0, metavar="PER_MINUTE",
                   help="requests a minute each clinic may make to the endpoints that make work (uploads, "
                        "evaluations); beyond it 429 with Retry-After (default 0: no limit)")
    p.add_argument("--burst", type=int, default=None, help="with --rate-limit: requests a clinic may make at once "
                                                          "(default: 10 seconds' worth)")
    p.add_argument("--no-auth", action="store_true", help="no bearer tokens (only for a server only you can reach)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run as a Ray Serve application on the Ray cluster at ADDRESS (e.g. auto, or HOST:6379; "
                        "without ADDRESS a local one); needs pip install 'medhe[cluster]'")
    p.add_argument("--replicas", type=int, default=2, help="with --ray: copies of the service (default 2); "
                                                            "--workers is then per replica (default 1)")
    p.add_argument("--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile the server speaks https")
    p.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("clinic", help="clinic: a local web page to diagnose DICOM/PNG/JPEG files with a "
                                             "diagnosis server (keys and encryption stay on this machine)")
    p.add_argument("--server", required=True, metavar="URL", help="the diagnosis server (`medhe serve`)")
    p.add_argument("--token", help="the clinic's access token for --server (default: $MEDHE_TOKEN)")
    p.add_argument("--keys", metavar="DIR", help="where this clinic's keys and model pins are kept "
                                                 "(default: ~/.medhe/servers/HOST_PORT, shared with medhe diagnose)")
    p.add_argument("--host", default="127.0.0.1", help="address of the local page (default 127.0.0.1: this "
                                                       "machine only)")
    p.add_argument("--port", type=int, default=8501, help="port of the local page (default 8501)")
    p.add_argument("--allow-remote-host", action="store_true",
                   help="let --host be an address other machines reach (put your own access control in front)")
    p.add_argument("--max-file-mb", type=float, default=256, help="largest image file read, in MiB (default 256)")
    add_ca_file_argument(p)
    add_backend_argument(p)
    p.set_defaults(func=cmd_clinic)

    p = subparsers.add_parser("token", help="operator: issue, list or revoke access tokens for clinics")
    p.add_argument("action", choices=("add", "list", "revoke"))
    p.add_argument("name", nargs="?", help="clinic (or model owner) name")
    p.add_argument("--role", choices=("clinic", "owner"), default="clinic")
    p.add_argument("--data-dir", default="medhe-server", help="the server's data directory")
    p.set_defaults(func=cmd_token)
