"""Beyond one machine: the same service as a Ray Serve application (`medhe serve --ray ADDRESS`).

Each replica is a Ray actor that builds the app from the shared data directory (plans, key store,
tokens) and evaluates in its own worker process(es), so its event loop keeps answering /health.
Replicas share the key store: keys registered through one are used by all (the store is
content-addressed and written atomically, so concurrent writers cannot corrupt it). On several
machines the data directory must be a shared file system (NFS or similar) mounted at the same
path on every node. Ray is an optional extra: `pip install 'medhe[cluster]'`.
"""

from __future__ import annotations

from pathlib import Path

from medhe.errors import ConfigError

DEPLOYMENT_NAME = "medhe"


def _serve():
    try:
        from ray import serve
    except ImportError:
        raise ConfigError("running on Ray needs the optional extra: pip install 'medhe[cluster]'") from None
    return serve


def ray_application(models, data_dir: str | Path, *, replicas: int, workers_per_replica: int = 1,
                    max_key_sets: int | None = 4, auth: bool = True, limits=None):
    """A Ray Serve application of `replicas` copies of the service for the hosted `models`."""
    from medhe.service.app import Limits

    serve = _serve()
    if replicas < 1 or workers_per_replica < 1:
        raise ConfigError("a Ray deployment needs at least 1 replica with at least 1 worker process")
    limits = limits or Limits()
    data_dir = str(Path(data_dir).resolve())
    hosted = [(m.name, m.backend, m.encrypted_model) for m in models]

    def build_app():
        # Runs on each replica: everything comes from the shared data directory.
        from medhe.service.app import create_app
        from medhe.service.auth import TokenStore
        from medhe.service.hosting import open_hosted

        return create_app([open_hosted(data_dir, name, backend=backend, encrypted_model=encrypted)
                           for name, backend, encrypted in hosted],
                          data_dir=data_dir, workers=workers_per_replica, max_key_sets=max_key_sets,
                          tokens=TokenStore(data_dir) if auth else None, limits=limits)

    # Ray may send a replica many requests at once: the app's own bound answers 503 beyond its
    # queue, and /health is never stuck behind evaluations. A replica reserves the cores of its
    # worker processes, so Ray spreads replicas over the cluster's cores.
    deployment = serve.deployment(serve.ingress(build_app)(), name=DEPLOYMENT_NAME, num_replicas=replicas,
                                  max_ongoing_requests=workers_per_replica + limits.queue_size + 32,
                                  ray_actor_options={"num_cpus": workers_per_replica})
    return deployment.bind()


def serve_on_ray(application, *, address: str | None, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None) -> None:
    """Connect to the Ray cluster at `address` ("local" starts one in this process), start Serve's
    HTTP proxy on host:port and run the application until interrupted."""
    import ray

    serve = _serve()
    ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True)
    http_options = {"host": host, "port": port}
    if ssl_certfile:
        http_options.update(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    serve.start(http_options=http_options)
    try:
        serve.run(application, name=DEPLOYMENT_NAME, route_prefix="/", blocking=True)
    finally:
        serve.delete(DEPLOYMENT_NAME)
