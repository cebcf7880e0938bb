"""`medhe serve`: run the diagnosis server over HTTP."""

from __future__ import annotations


def cmd_serve(args) -> int:
    import uvicorn

    from medhe.cli.he_cmd import load_server_plan
    from medhe.plan.report import format_report
    from medhe.service.app import create_app

    plan, encrypted = load_server_plan(args)
    if plan.report:
        print(format_report(plan.report))
    app = create_app(plan, backend=args.backend, key_dir=args.key_store, encrypted_model=encrypted is not None,
                     encrypted_models=(encrypted,) if encrypted is not None else ())
    mode = "encrypted-model mode: the weights are ciphertexts" if encrypted is not None else "plain weights"
    print(f"serving model spec {plan.client_spec().digest()[:16]} ({mode}) on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def register(subparsers) -> None:
    from medhe.cli.he_cmd import add_plan_arguments

    p = subparsers.add_parser("serve", help="server: run the encrypted diagnosis HTTP service")
    add_plan_arguments(p, encrypted_model=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--key-store", default=None,
                   help="directory where registered evaluation keys and encrypted models are kept")
    p.set_defaults(func=cmd_serve)
